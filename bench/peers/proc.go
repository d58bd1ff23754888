package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Readings of /proc: the processes of a peer (a root pid and its
// descendants), their CPU time and their proportional set size, a CPU's busy
// time, and whether a loopback port listens.

// procStat is the part of /proc/PID/stat the harness uses.
type procStat struct {
	ppid  int
	ticks int64 // utime + stime + cutime + cstime, in clock ticks
}

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	// The command name is in parentheses and may hold blanks: the fields
	// start after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): ppid is field 4, utime..cstime 14..17.
	if len(f) < 15 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var st procStat
	st.ppid, _ = strconv.Atoi(f[1])
	for _, k := range f[11:15] {
		n, _ := strconv.ParseInt(k, 10, 64)
		st.ticks += n
	}
	return st, nil
}

// tree returns root and its live descendants.
func tree(root int) []int {
	if root <= 0 {
		return nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return []int{root}
	}
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		children[st.ppid] = append(children[st.ppid], pid)
	}
	out := []int{root}
	for i := 0; i < len(out) && i < 1<<20; i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

// treeTicks is the CPU time of root and its descendants: every live
// process's own time plus that of its reaped children, so a child that ends
// during a measurement is counted once, in its parent.
func treeTicks(root int) int64 {
	var sum int64
	for _, pid := range tree(root) {
		if st, err := readStat(pid); err == nil {
			sum += st.ticks
		}
	}
	return sum
}

// treePSS is the proportional set size of root and its descendants, in
// bytes, from /proc/PID/smaps_rollup; and how many processes were summed.
func treePSS(root int) (bytes int64, procs int) {
	for _, pid := range tree(root) {
		if n, err := pss(pid); err == nil {
			bytes += n
			procs++
		}
	}
	return bytes, procs
}

func pss(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "Pss:" {
			n, err := strconv.ParseInt(f[1], 10, 64)
			return n * 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/smaps_rollup: no Pss", pid)
}

// timeWait returns the TCP sockets in TIME_WAIT (the "tw" count of
// /proc/net/sockstat, this network namespace), or -1. Thousands of them mean
// the ephemeral ports are running out, and every connect searches for one.
func timeWait() int64 {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return -1
	}
	return parseTimeWait(string(b))
}

// parseTimeWait returns the "tw" count of the "TCP:" line of a sockstat
// text, or -1.
func parseTimeWait(sockstat string) int64 {
	for _, line := range strings.Split(sockstat, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			if f[i] == "tw" {
				if n, err := strconv.ParseInt(f[i+1], 10, 64); err == nil {
					return n
				}
			}
		}
	}
	return -1
}

// cpuTimes returns the busy and total ticks of one CPU from /proc/stat.
func cpuTimes(cpu int) (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	want := "cpu" + strconv.Itoa(cpu)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || f[0] != want {
			continue
		}
		for i, s := range f[1:] {
			n, _ := strconv.ParseInt(s, 10, 64)
			if i >= 8 { // guest times are already in user and nice
				break
			}
			total += n
			if i != 3 && i != 4 { // idle, iowait
				busy += n
			}
		}
	}
	return busy, total
}

// loadAvg returns the 1-minute load average.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// listening reports whether a TCP socket listens on 127.0.0.1:port (or on
// the IPv4 wildcard), without connecting to it: a probe connection would
// reach backends such as iperf3 that count every connection.
func listening(port int) bool {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return false
	}
	want1 := fmt.Sprintf("0100007F:%04X", port)
	want2 := fmt.Sprintf("00000000:%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[3] == "0A" && (f[1] == want1 || f[1] == want2) {
			return true
		}
	}
	return false
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times; 100 on every
// Linux architecture Go supports.
const clockTicks = 100
