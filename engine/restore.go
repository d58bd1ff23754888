package engine

import "errors"

// SetGeneration sets the active table's generation, so that generations
// continue across restarts (the daemon's state dir): the next commit makes
// it g+1. Only before the first apply, while no table is active.
func (e *Engine) SetGeneration(g uint64) error {
	e.amu.Lock()
	defer e.amu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pending != nil || len(e.rules) > 0 || e.gen != 0 {
		return errors.New("engine: SetGeneration after a table was applied")
	}
	e.gen = g
	return nil
}
