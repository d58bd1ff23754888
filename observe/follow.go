package observe

import "fmt"

// TableFollower follows the rule table through a watch of group rules: the
// state event, then applied, committed and rolled-back. Next reports any
// event that does not follow from what came before: a gap (an event lost),
// a repeat, or one out of order.
type TableFollower struct {
	Gen     uint64 // the active table's generation
	Pending bool   // an apply awaits its commit or rollback
	Started bool   // the state was seen
	Events  int    // events after the state
}

// Next feeds one rules event: its type, generation and, for the state, its
// pending field.
func (f *TableFollower) Next(typ string, gen uint64, pending bool) error {
	if typ == TypeState {
		if f.Started {
			return fmt.Errorf("a second state event (generation %d)", gen)
		}
		f.Gen, f.Pending, f.Started = gen, pending, true
		return nil
	}
	if !f.Started {
		return fmt.Errorf("%s (generation %d) before the state", typ, gen)
	}
	f.Events++
	switch typ {
	case "applied":
		if f.Pending || gen != f.Gen+1 {
			return fmt.Errorf("applied generation %d at generation %d (pending %v): an event was lost or repeated", gen, f.Gen, f.Pending)
		}
		f.Pending = true
	case "committed":
		if !f.Pending || gen != f.Gen+1 {
			return fmt.Errorf("committed generation %d at generation %d (pending %v): an event was lost or repeated", gen, f.Gen, f.Pending)
		}
		f.Gen, f.Pending = gen, false
	case "rolled-back":
		if !f.Pending || gen != f.Gen {
			return fmt.Errorf("rolled back to generation %d at generation %d (pending %v): an event was lost or repeated", gen, f.Gen, f.Pending)
		}
		f.Pending = false
	default:
		return fmt.Errorf("unknown rules event %q", typ)
	}
	return nil
}
