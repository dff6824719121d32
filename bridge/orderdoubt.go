package bridge

// Order doubt. A homeserver that pushes events out of their room's order (Dendrite 0.13.8) does so only after
// something went wrong: after it restarts, an event that was on its way to ferry comes again about 30 s later
// (its queue redelivers what was not acknowledged once its ack wait ends), after events that followed it. Holding
// every pushed event until the bot's /sync has shown the room's order costs each message a /sync round trip, so
// ferry holds them only while the order is in doubt: for orderDoubtWindow after ferry starts, after a /sync of
// one of its devices failed (the homeserver went away) until that long after /sync answers again, after an
// outage of the homeserver, and after ferry answered a transaction with an error or got an event again. An event
// pushed while the order is in doubt waits for /sync (orderHold); one pushed while it is not is relayed at once.

import (
	"net/http"
	"strings"
	"sync"
	"time"
)

// orderDoubtWindow is how long the order stays in doubt after its last cause: four times the ack wait after
// which Dendrite's queue redelivers.
var orderDoubtWindow = 2 * time.Minute

// orderDoubt says which pushed events wait for /sync to show their room's order.
type orderDoubt struct {
	// guards the following fields
	lock    sync.Mutex
	until   time.Time // events pushed until then wait
	failing bool      // the last /sync failed: in doubt until one answers again
}

// doubt puts the order in doubt from now for orderDoubtWindow.
func (d *orderDoubt) doubt(now time.Time) {
	d.lock.Lock()
	if u := now.Add(orderDoubtWindow); u.After(d.until) {
		d.until = u
	}
	d.lock.Unlock()
}

// syncAnswered records the outcome of a /sync request.
func (d *orderDoubt) syncAnswered(ok bool, now time.Time) {
	d.lock.Lock()
	was := d.failing
	d.failing = !ok
	d.lock.Unlock()
	if was && ok {
		d.doubt(now)
	}
}

// covers tells whether an event pushed at received must wait for /sync.
func (d *orderDoubt) covers(received time.Time) bool {
	d.lock.Lock()
	defer d.lock.Unlock()
	return d.failing || !received.After(d.until)
}

// isSync tells whether req is a /sync request.
func isSync(req *http.Request) bool {
	return req.Method == http.MethodGet && strings.HasSuffix(req.URL.Path, "/sync")
}
