package conn

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// Every end code is a row of README.md's "How a session ends" table, with
// its number and name: a code added without its documentation fails here.
func TestCodesDocumented(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for c := CodeDone; int(c) < len(codeNames); c++ {
		if reservedCode(c) {
			continue
		}
		if row := fmt.Sprintf("| %d | `%s` |", c, c); !strings.Contains(string(readme), row) {
			t.Errorf("README.md has no row %q for code %d", row, c)
		}
	}
}
