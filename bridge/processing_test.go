package bridge

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/metrics"
)

// slowEncrypt is scriptedCrypto whose encryption takes a while, as a key share does.
type slowEncrypt struct {
	*scriptedCrypto
	took time.Duration
}

func (c slowEncrypt) Encrypt(ctx context.Context, sender id.UserID, room id.RoomID, typ event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	time.Sleep(c.took)
	return c.scriptedCrypto.Encrypt(ctx, sender, room, typ, content)
}

// histogramSum reads a histogram's sum of observations, in seconds.
func histogramSum(t *testing.T, h interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleSum()
}

// TestRelayProcessingIsFerrysOwnPart: ferry_relay_processing_seconds counts what ferry does before its request
// to the homeserver, its encryption (and any key share in it) included, and not the homeserver's answer, which
// ferry_relay_latency_seconds adds.
func TestRelayProcessingIsFerrysOwnPart(t *testing.T) {
	const encrypt, answer = 60 * time.Millisecond, 200 * time.Millisecond
	cr := newScriptedCrypto()
	f := newRelayFixtureWith(t, slowEncrypt{cr, encrypt})
	f.br.Config.GhostJoinWait = 0 // the ghost's first message would wait for its join to settle, in ferry's part
	f.flaky.lock.Lock()
	f.flaky.script = append(f.flaky.script, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(answer)
		f.flaky.proxy.ServeHTTP(w, r)
	})
	f.flaky.lock.Unlock()
	processing, latency := histogramSum(t, metrics.RelayProcessing), histogramSum(t, metrics.RelayLatency)
	evtID := id.EventID(fmt.Sprintf("$processing%d", time.Now().UnixNano()))
	cr.cleartext[evtID] = &event.Event{Type: event.EventMessage, Content: event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "timed"}}}
	f.process(t, encryptedFrom(evtID, f.roomA, f.alice))
	own := time.Duration((histogramSum(t, metrics.RelayProcessing) - processing) * float64(time.Second))
	all := time.Duration((histogramSum(t, metrics.RelayLatency) - latency) * float64(time.Second))
	if own < encrypt || own >= answer {
		t.Errorf("ferry's own part %v: want the encryption's %v in it and not the homeserver's answer (%v)", own, encrypt, answer)
	}
	if all < encrypt+answer {
		t.Errorf("the whole relay latency %v: want at least %v", all, encrypt+answer)
	}
}
