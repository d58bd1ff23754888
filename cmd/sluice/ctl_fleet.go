package main

// `sluice ctl rollout` and `sluice ctl fleet`: a fleet that follows etcd
// (store/etcd), driven from the operator's side. They talk to etcd, never
// to a control socket.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/rules"
	"github.com/sluice-proxy/sluice/store/etcd"
)

const fleetSynopsis = `sluice ctl rollout FILE --etcd URL[,URL] --prefix P [--instances ID,...] [--batch N]
                    [--timeout DUR] [--json]
       sluice ctl rollout --resume|--revert --etcd URL[,URL] --prefix P
       sluice ctl fleet --etcd URL[,URL] --prefix P [--json]
  rollout   store FILE as a new version and assign it batch by batch (default: one
            instance, then the rest), each batch waited for until it reports the
            version committed; anything else, or nothing within --timeout, halts it:
            the instances moved are assigned their previous version again (exit 3)
  fleet     each instance's assigned and reported version, generation, outcome, age
TLS: --ca, --cert, --key; --user, the password in $SLUICE_ETCD_PASSWORD.`

// fleetCmd is one run of rollout or fleet.
type fleetCmd struct {
	out           io.Writer
	endpoints     string
	prefix        string
	instances     string
	batch         int
	timeout       time.Duration
	json          bool
	resume        bool
	revert        bool
	ca, cert      string
	key, etcdUser string
}

// isFleetVerb says whether args (ctl's) start with rollout or fleet.
func isFleetVerb(args []string) bool {
	return len(args) > 0 && (args[0] == "rollout" || args[0] == "fleet")
}

func cmdFleet(args []string, stdout, stderr io.Writer) error {
	verb := args[0]
	x := &fleetCmd{out: stdout}
	fs := newFlagSet("ctl "+verb, fleetSynopsis)
	fs.SetOutput(stderr)
	fs.StringVar(&x.endpoints, "etcd", "", "etcd client URLs, comma-separated")
	fs.StringVar(&x.prefix, "prefix", "", "the fleet's key prefix (/sluice/NAME)")
	fs.StringVar(&x.instances, "instances", "", "rollout: these instance IDs, comma-separated, in this order (default: every instance with a status or an assignment)")
	fs.IntVar(&x.batch, "batch", 0, "rollout: instances per batch (default: one, then the rest)")
	fs.DurationVar(&x.timeout, "timeout", 60*time.Second, "rollout: how long each batch may take to report")
	fs.BoolVar(&x.json, "json", false, "print one JSON object")
	fs.BoolVar(&x.resume, "resume", false, "rollout: take over the rollout in progress (its process lost) and carry it on")
	fs.BoolVar(&x.revert, "revert", false, "rollout: take over the rollout in progress and assign back the previous versions")
	fs.StringVar(&x.ca, "ca", "", "etcd: the CA file that verifies the server")
	fs.StringVar(&x.cert, "cert", "", "etcd: the client certificate file")
	fs.StringVar(&x.key, "key", "", "etcd: the client key file")
	fs.StringVar(&x.etcdUser, "user", "", "etcd: the user (password in $"+etcd.PasswordEnv+")")
	pos, help, err := parseCommand(fs, args[1:])
	if help || err != nil {
		return err
	}
	switch {
	case x.endpoints == "":
		return usagef("%s: want --etcd URL[,URL]", verb)
	case !strings.HasPrefix(x.prefix, "/") || strings.HasSuffix(x.prefix, "/"):
		return usagef("%s: want --prefix /sluice/NAME (starting with /, not ending with one), got %q", verb, x.prefix)
	case x.timeout <= 0:
		return usagef("--timeout %s: want more than 0", x.timeout)
	case x.batch < 0:
		return usagef("--batch %d: want 1 or more", x.batch)
	}
	if verb == "fleet" {
		if len(pos) != 0 || x.instances != "" || x.batch != 0 || x.resume || x.revert {
			return usagef("fleet: no arguments; --instances, --batch, --resume and --revert are for rollout")
		}
		return x.fleet()
	}
	switch {
	case x.resume && x.revert:
		return usagef("rollout: --resume or --revert, not both")
	case (x.resume || x.revert) && (len(pos) != 0 || x.instances != "" || x.batch != 0):
		return usagef("rollout --resume/--revert: no FILE, --instances or --batch: the rollout in progress has them")
	case !x.resume && !x.revert && len(pos) != 1:
		return usagef("rollout: want one rules FILE, got %d arguments", len(pos))
	}
	var table []byte
	if len(pos) == 1 {
		src, err := config.ReadFile(pos[0])
		if err != nil {
			return usageError{err}
		}
		entries, err := rules.ParseFile(pos[0], src)
		if err != nil {
			return err // FILE:LINE: message
		}
		table = []byte(rules.Format(rules.RulesOf(entries)))
	}
	return x.rollout(table)
}

// open connects to etcd with the flags' settings.
func (x *fleetCmd) open() (*etcd.Fleet, error) {
	tc, err := etcd.TLSConfig(x.ca, x.cert, x.key)
	if err != nil {
		return nil, usageError{err}
	}
	pw, _ := etcd.ReadPassword("")
	return etcd.OpenFleet(etcd.Conn{Endpoints: strings.Split(x.endpoints, ","), TLS: tc, User: x.etcdUser, Password: pw}, x.prefix)
}

func (x *fleetCmd) rollout(table []byte) error {
	f, err := x.open()
	if err != nil {
		return err
	}
	defer f.Close()
	opt := etcd.RolloutOptions{Batch: x.batch, Timeout: x.timeout, Holder: holder(), Resume: x.resume, Revert: x.revert}
	if x.instances != "" {
		opt.Instances = strings.Split(x.instances, ",")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute+time.Duration(max(2, len(opt.Instances)+1))*x.timeout)
	defer cancel()
	rep, err := f.Rollout(ctx, table, opt)
	var held *etcd.HeldError
	switch {
	case errors.As(err, &held):
		return &exitError{exitBusy, err}
	case errors.Is(err, etcd.ErrNoInstances):
		return usageError{err}
	}
	if rep != nil {
		if x.json {
			enc := json.NewEncoder(x.out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(rep); err != nil {
				return err
			}
		} else {
			for i := range rep.Instances {
				fmt.Fprintln(x.out, rep.Instances[i].Line(rep.Version))
			}
		}
	}
	if err != nil {
		return err
	}
	switch rep.Outcome {
	case etcd.RolloutCommitted:
		if !x.json {
			fmt.Fprintf(x.out, "rollout %s: committed on %s %s\n", rep.Version, allOf(len(rep.Instances)), plural(len(rep.Instances), "instance"))
		}
		return nil
	case etcd.RolloutHalted:
		return &exitError{exitRollback, fmt.Errorf("rollout %s halted at batch %d of %d: the instances moved are assigned their previous version again", rep.Version, rep.Halted, rep.Batches)}
	}
	return &exitError{exitRollback, fmt.Errorf("rollout %s reverted: the instances moved are assigned their previous version again", rep.Version)}
}

func (x *fleetCmd) fleet() error {
	f, err := x.open()
	if err != nil {
		return err
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), x.timeout)
	defer cancel()
	v, err := f.Read(ctx)
	if err != nil {
		return err
	}
	if x.json {
		enc := json.NewEncoder(x.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	tw := tabwriter.NewWriter(x.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INSTANCE\tASSIGNED\tVERSION\tGENERATION\tOUTCOME\tAGE")
	now := time.Now()
	for _, m := range v.Members {
		assigned := dash(m.Assigned)
		switch st := m.Status; {
		case m.Bad != "":
			fmt.Fprintf(tw, "%s\t%s\t-\t-\tbad status: %s\t-\n", m.Instance, assigned, m.Bad)
		case st == nil:
			fmt.Fprintf(tw, "%s\t%s\t-\t-\tno status (down?)\t-\n", m.Instance, assigned)
		default:
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", m.Instance, assigned, dash(st.Version), st.Generation, st.Outcome,
				now.Sub(st.Time).Truncate(time.Second))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if p := v.Rollout; p != nil {
		fmt.Fprintf(x.out, "rollout of %s %s: %d of %d batches done, held by %s since %s (updated %s ago; lost? sluice ctl rollout --resume or --revert)\n",
			p.Version, p.State, p.Done, len(p.Batches), p.Holder, p.Started.Format(time.RFC3339), now.Sub(p.Updated).Truncate(time.Second))
	}
	for _, k := range v.Other {
		fmt.Fprintf(x.out, "a key of another shape: %s\n", k)
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// holder names this process for the rollout guard: user@host pid N.
func holder() string {
	name := "?"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return fmt.Sprintf("%s@%s pid %d", name, host, os.Getpid())
}
