// Package ctl will own the control protocol: its wire format, the server's
// transaction state machine, the Go client library and watch groups. It is
// empty until that work lands; see ../shared/DESIGN.md, "The control
// transaction".
package ctl
