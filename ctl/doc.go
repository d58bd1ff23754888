// Package ctl is sluice's control protocol: the wire format (wire.go,
// msg.go, codes.go), the server that runs one transaction per connection on
// a unix socket and drives the engine through the Engine interface
// (server.go, listen.go; one control connection: ctlconn.go; the writing
// transaction: txn.go), the Go client library (client.go), and one
// transaction driven across several instances (multi.go: Multi).
//
// A transaction: server hello, client hello (with the service upgrade to
// version 2), pifs, the active table, the new table loaded and validated,
// apply, the bind summary, commit or rollback. One writer at a time;
// status, pifs and list are served beside it. The wire format, every bound
// and every error code are in docs/ctl-protocol.md, which the tests check
// against the code.
//
// Serving:
//
//	srv, err := ctl.Serve(ctx, "/run/sluice/ctl.sock", eng, log)
//	...
//	defer srv.Close() // rolls back an open transaction
//
// A daemon that stops calls srv.Drain(deadline) first (drain.go): the
// socket serves only the read-only intents until Close, and refuses the
// others with CodeDraining.
//
// A client, step by step (each call bounded by its context):
//
//	c, err := ctl.Dial(ctx, path, ctl.Options{})
//	err = c.Hello(ctx, ctl.IntentWrite)           // ctl.CodeOf(err) == ctl.CodeBusy: another writer
//	pifs, err := c.Pifs(ctx)
//	table, err := c.List(ctx)
//	loaded, err := c.Load(ctx, table.Generation, newRules)
//	sum, err := c.Apply(ctx, 30*time.Second)      // the confirm timeout
//	if sum.OK { _, err = c.Commit(ctx) } else { _, err = c.Rollback(ctx) }
//
// Read-only beside it (watch.go): a watch (IntentWatch, Pifs, Watch, then
// NextEvent: the current state first, then each event; a watcher that falls
// behind is cut off with CodeSlowWatcher), the live sessions
// (IntentSessions, Pifs, Sessions) and the engine's counters (IntentStats,
// Stats).
//
// Each Client is one connection to one instance, tracked on its own: a
// caller drives several instances in lock-step by holding one Client per
// instance and doing each step on all of them before the next.
package ctl
