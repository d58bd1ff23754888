package layers

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path"
	"regexp"
	"strings"
	"testing"
)

// The code map of docs/architecture.md names places as `file.go:Name`
// (Name a function, a method as Type.Method, a type, a variable or a
// constant), followed by more names of the same file (`, `Other``), more
// files of the same folder (`, `other.go``) or another place. Each must
// exist, so the map cannot drift from the code.

var (
	placeRE = regexp.MustCompile("`(\\w+/[\\w/]*\\.go)(?::([\\w.]+))?`((?:, `[^`]+`)*)")
	fullRE  = regexp.MustCompile(`^(\w+/[\w/]*\.go)(?::([\w.]+))?$`)
	tailRE  = regexp.MustCompile("`([^`]+)`")
)

func TestCodeMapNamesExist(t *testing.T) {
	doc, err := os.ReadFile("../../docs/architecture.md")
	if err != nil {
		t.Fatal(err)
	}
	decls := map[string]map[string]bool{} // file -> declared names
	declared := func(file string) map[string]bool {
		if d, ok := decls[file]; ok {
			return d
		}
		d := map[string]bool{}
		decls[file] = d
		f, err := parser.ParseFile(token.NewFileSet(), "../../"+file, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Errorf("docs/architecture.md names %s: %v", file, err)
			return d
		}
		for _, decl := range f.Decls {
			switch x := decl.(type) {
			case *ast.FuncDecl:
				name := x.Name.Name
				if x.Recv != nil && len(x.Recv.List) > 0 {
					typ := x.Recv.List[0].Type
					if s, ok := typ.(*ast.StarExpr); ok {
						typ = s.X
					}
					if id, ok := typ.(*ast.Ident); ok {
						d[id.Name+"."+name] = true
					}
				}
				d[name] = true
			case *ast.GenDecl:
				for _, spec := range x.Specs {
					switch s := spec.(type) {
					case *ast.TypeSpec:
						d[s.Name.Name] = true
					case *ast.ValueSpec:
						for _, n := range s.Names {
							d[n.Name] = true
						}
					}
				}
			}
		}
		return d
	}
	places := 0
	for i, line := range strings.Split(string(doc), "\n") {
		for _, m := range placeRE.FindAllStringSubmatch(line, -1) {
			file, name, tail := m[1], m[2], m[3]
			check := func(file, name string) {
				places++
				d := declared(file)
				if name != "" && !d[name] {
					t.Errorf("docs/architecture.md:%d: %s declares no %s", i+1, file, name)
				}
			}
			check(file, name)
			for _, tm := range tailRE.FindAllStringSubmatch(tail, -1) {
				tok := tm[1]
				switch f := fullRE.FindStringSubmatch(tok); {
				case f != nil: // another file: later names are its own
					file = f[1]
					check(file, f[2])
				case strings.HasSuffix(tok, "/"): // a folder
				case strings.HasSuffix(tok, ".go"): // a file beside the last
					check(path.Join(path.Dir(file), tok), "")
				default:
					check(file, tok)
				}
			}
		}
	}
	if places < 40 {
		t.Errorf("found %d places in docs/architecture.md; the code map seems to be gone", places)
	}
}
