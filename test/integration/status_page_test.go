package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"html"
	"image"
	"image/png"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/testpeer"
	"github.com/sluice-proxy/sluice/rules"
)

// chromiumFlags run Debian's chromium headless, isolated, with nothing
// fetched but the page asked for.
var chromiumFlags = []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
	"--disable-background-networking", "--disable-component-update", "--disable-sync"}

// findChromium returns chromium's path. Without it the test is skipped, and
// says so, only when it cannot be installed: as root scripts/test-deps.sh
// installs it, so its absence is a failure.
func findChromium(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err == nil {
		return path
	}
	if os.Geteuid() == 0 {
		t.Fatalf("chromium is not installed (scripts/test-deps.sh installs it): %v", err)
	}
	t.Skip("SKIPPED: the status page test needs Debian's chromium package; run scripts/test-deps.sh as root to install it")
	return ""
}

// runChromium runs chromium on url with extra flags and returns its stdout.
func runChromium(t *testing.T, bin, url string, extra ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args := append(append(append([]string(nil), chromiumFlags...), "--user-data-dir="+t.TempDir()), extra...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium %v: %v\n%s", extra, err, tail(stderr.String(), 2000))
	}
	return out
}

// The status page of a running daemon, as a phone's browser shows it: rules
// with their listeners and bind state (a weak rule with a port taken),
// backends with passive health (one refused a connect), live sessions and
// counters after real traffic, the table's apply and commit. Checked in the
// DOM headless Chromium built, and screenshot at a phone's size.
func TestStatusPageInChromium(t *testing.T) {
	bin := findChromium(t)
	back := hashBackend(t)
	dead := func() string { // a port nothing listens on
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}()
	web, pool, health := freePort(t), freePort(t), freePort(t)
	weak := freeRange(t, 2)
	taken, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", weak+1))
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	metricsPort := freePort(t)
	lines := []string{
		fmt.Sprintf("tcp 127.0.0.1:%d -> %s", web, back.Addr()),
		fmt.Sprintf("tcp 127.0.0.1:%d -> %s,%s", pool, dead, back.Addr()),
		fmt.Sprintf("tcp 127.0.0.1:%d health=http", health),
		fmt.Sprintf("tcp 127.0.0.1:%d-%d -> %s weak", weak, weak+1, back.Addr()),
	}
	cfg := fmt.Sprintf("loops: 2\nlog: {level: info, format: json}\nmetrics: {listen: 127.0.0.1:%d}\nrules:\n", metricsPort)
	for _, l := range lines {
		cfg += "  - " + l + "\n"
	}
	d := startDaemon(t, forwardOpts{}, "run", "-c", writeFile(t, "sluice.yaml", cfg))
	d.waitListening(fmt.Sprintf("127.0.0.1:%d", metricsPort)) // up after every rule is (so no session is made waiting)

	for i := range 3 {
		exchangeVia(t, fmt.Sprintf("127.0.0.1:%d", web), uint64(i))
	}
	for i := range 2 { // round robin: the first tries the dead backend, then the live one
		exchangeVia(t, fmt.Sprintf("127.0.0.1:%d", pool), uint64(10+i))
	}
	// A probe (raw: the reply comes at once, before any request is read).
	probe, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", health))
	if err != nil {
		t.Fatal(err)
	}
	probe.SetDeadline(time.Now().Add(5 * time.Second))
	reply, err := io.ReadAll(probe)
	probe.Close()
	if err != nil || !strings.HasPrefix(string(reply), "HTTP/1.0 200 OK\r\n") {
		t.Fatalf("health rule: %q %v", reply, err)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d/", metricsPort)
	waitFor(t, 5*time.Second, "the sessions to end", func() bool {
		_, text := httpGet(t, base+"metrics")
		v, ok := metricValue(text, `sluice_sessions_ended_total{code="1",reason="done"}`)
		s, _ := metricValue(text, "sluice_sessions")
		return ok && v == 5 && s == 0
	})

	dom := html.UnescapeString(string(runChromium(t, bin, base, "--dump-dom")))
	want := []string{"<title>sluice status</title>", "Live sessions", `id="sessions">0<`, `Rates per second, <span class="window">last 10 s</span>`, `Rates per second, <span class="window">last 60 s</span>`, `Refused<b id="refused">0</b>`, "Open fds",
		"Last transactions", ">apply<", ">commit<", "table generation 1",
		"1/1 ports bound", "1/2 ports bound", fmt.Sprintf("port %d: address already in use", weak+1),
		"accepted 3", "health replies 1 ok, 0 fail", back.Addr(), ">up<",
		fmt.Sprintf("127.0.0.1:%d", web), "listening", `href="/metrics"`}
	for _, l := range lines {
		r, err := rules.Parse(l)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, r.String())
	}
	for _, s := range want {
		if !strings.Contains(dom, s) {
			t.Errorf("the DOM lacks %q", s)
		}
	}
	// The dead backend of the pool: its failed connect counted; it is down
	// for 5 s after it, so by now it may be up again.
	row := regexp.MustCompile(`<code>` + regexp.QuoteMeta(dead) + `</code></td><td><span class="pill( bad)?">(up|down)</span></td><td>0</td><td>1</td>`)
	if !row.MatchString(dom) {
		t.Errorf("the DOM has no row for the dead backend %s with 1 connect failure", dead)
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}

	// At a phone's size and a desktop's: the white of the cards and rules
	// spans the screen less the page's padding on the phone, and a centred
	// 1400 px column less its padding on the desktop.
	for _, size := range []struct {
		name     string
		w, h     int
		min, max int // the width the white spans
	}{{"status.png", 412, 915, 412 - 2*12 - 4, 412 - 2*12}, {"status-desktop.png", 1600, 1000, 1400 - 2*24 - 4, 1400 - 2*24}} {
		shot := filepath.Join(t.TempDir(), size.name)
		runChromium(t, bin, base, "--screenshot="+shot, fmt.Sprintf("--window-size=%d,%d", size.w, size.h), "--hide-scrollbars")
		left, right := whiteSpan(checkScreenshot(t, shot, size.w, size.h))
		if w := right - left; w < size.min || w > size.max || left-(size.w-right) > 2 || (size.w-right)-left > 2 {
			t.Errorf("%d px wide: the page's white spans x %d to %d (%d px), want %d to %d px, centred", size.w, left, right, w, size.min, size.max)
		}
		if dir := os.Getenv("SLUICE_SCREENSHOT_DIR"); dir != "" { // to look at it
			if b, err := os.ReadFile(shot); err == nil {
				_ = os.WriteFile(filepath.Join(dir, size.name), b, 0o644)
			}
		}
	}

	// The same sessions in the access log: one json line each, with its
	// termination code.
	if err := d.stop(10 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	terms := map[string]int{}
	for _, l := range strings.Split(d.stderr.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil || m["msg"] != "session" {
			continue
		}
		term, _ := m["term"].(string)
		terms[term]++
		if m["backend"] != back.Addr() || m["rule"] == nil || m["connect"] == nil || m["handshake"] == nil {
			t.Errorf("access log line: %s", l)
		}
	}
	if terms["--"] != 5 || len(terms) != 1 {
		t.Errorf("access log termination codes: %v, want 5 \"--\"", terms)
	}
}

// exchangeVia runs one checked exchange through addr.
func exchangeVia(t *testing.T, addr string, seed uint64) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := testpeer.Exchange(c, 2000, 5000, seed); err != nil {
		t.Fatalf("exchange via %s: %v", addr, err)
	}
}

// whiteSpan returns the columns from the leftmost white pixel of img to
// just past the rightmost one: the extent of the page's cards and rules
// (white on a grey background).
func whiteSpan(img image.Image) (left, right int) {
	bounds := img.Bounds()
	left, right = bounds.Max.X, bounds.Min.X
	for y := bounds.Min.Y; y < bounds.Max.Y; y++ {
		for x := bounds.Min.X; x < bounds.Max.X; x++ {
			if r, g, b, _ := img.At(x, y).RGBA(); r == 0xffff && g == 0xffff && b == 0xffff {
				left, right = min(left, x), max(right, x+1)
			}
		}
	}
	return left, right
}

// checkScreenshot checks that file is a PNG of w×h with something drawn on
// it: more than a few colours (text is anti-aliased), and some bytes. It
// returns the image.
func checkScreenshot(t *testing.T, file string, w, h int) image.Image {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	if len(b) < 8<<10 {
		t.Errorf("screenshot is %d bytes: too small to show the page", len(b))
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if got := img.Bounds(); got != image.Rect(0, 0, w, h) {
		t.Errorf("screenshot is %v, want %dx%d", got, w, h)
	}
	colours := map[[4]uint32]bool{}
	for y := img.Bounds().Min.Y; y < img.Bounds().Max.Y; y += 2 {
		for x := img.Bounds().Min.X; x < img.Bounds().Max.X; x += 2 {
			r, g, b, a := img.At(x, y).RGBA()
			colours[[4]uint32{r, g, b, a}] = true
		}
	}
	if len(colours) < 32 {
		t.Errorf("screenshot has %d colours: a blank page?", len(colours))
	}
	t.Logf("screenshot %s: %d bytes, %d colours", file, len(b), len(colours))
	return img
}
