package metrics

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

// Errcode label values that are not a homeserver's errcode.
const (
	ErrcodeNone    = "none"    // the request succeeded
	ErrcodeNetwork = "network" // no answer: connection refused or lost, timeout
	ErrcodeOther   = "other"   // an errcode outside the Matrix namespace's shape
)

// maxErrorPeek is how much of an error answer is read for its errcode; Matrix errors are a few hundred bytes.
const maxErrorPeek = 4096

// errcodePattern is the shape of a Matrix errcode; anything else is counted as ErrcodeOther, so a homeserver
// cannot add label values at will.
var errcodePattern = regexp.MustCompile(`^M_[A-Z0-9_]{1,48}$`)

// Transport counts every request through next in HomeserverRequests. It reads the errcode of an error answer
// (the first maxErrorPeek bytes, put back for the caller) and nothing of a successful one.
func Transport(next http.RoundTripper) http.RoundTripper {
	return &transport{next: next}
}

type transport struct {
	next http.RoundTripper
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	errcode := ErrcodeNone
	switch {
	case err != nil:
		errcode = ErrcodeNetwork
	case resp.StatusCode >= 400:
		errcode = peekErrcode(resp)
	}
	HomeserverRequests.WithLabelValues(req.Method, Endpoint(req.URL.Path), errcode).Inc()
	return resp, err
}

// peekErrcode reads the errcode of an error answer and leaves its body readable from the start.
func peekErrcode(resp *http.Response) string {
	head, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorPeek))
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(head), resp.Body), resp.Body}
	var body struct {
		Errcode string `json:"errcode"`
	}
	if json.Unmarshal(head, &body) != nil || body.Errcode == "" {
		return "http_" + strconv.Itoa(resp.StatusCode)
	}
	if !errcodePattern.MatchString(body.Errcode) {
		return ErrcodeOther
	}
	return body.Errcode
}

// literalSegments are the path segments of the Matrix APIs ferry calls that name an endpoint rather than an ID.
var literalSegments = map[string]bool{
	"_matrix": true, "client": true, "media": true, "app": true, "key": true, "v1": true, "v2": true, "v3": true, "r0": true,
	"unstable": true, "rooms": true, "room": true, "send": true, "state": true, "redact": true, "join": true, "leave": true,
	"invite": true, "kick": true, "ban": true, "unban": true, "members": true, "joined_members": true, "messages": true,
	"event": true, "context": true, "relations": true, "sync": true, "keys": true, "upload": true, "query": true, "claim": true,
	"changes": true, "signatures": true, "device_signing": true, "sendToDevice": true, "account": true, "whoami": true,
	"password": true, "register": true, "login": true, "logout": true, "profile": true, "displayname": true,
	"avatar_url": true, "user": true, "account_data": true, "devices": true, "delete_devices": true, "versions": true,
	"appservice": true, "ping": true, "directory": true, "createRoom": true, "typing": true, "receipt": true,
	"read_markers": true, "download": true, "thumbnail": true, "config": true, "capabilities": true, "filter": true,
	"_synapse": true, "_dendrite": true, "admin": true, "joined_rooms": true, "aliases": true, "power_levels": true,
	"timestamp_to_event": true, "room_keys": true, "version": true, "presence": true, "status": true,
}

// Endpoint is the template of a Matrix API path: literal segments stay, IDs become placeholders named by their
// sigil ({roomId}, {eventId}, {userId}, {alias}) or {id}. /_matrix/client/v3/rooms/!a:b/send/m.room.encrypted/t1
// becomes /_matrix/client/v3/rooms/{roomId}/send/{id}/{id}.
func Endpoint(path string) string {
	path = strings.TrimPrefix(path, "/")
	var b strings.Builder
	b.Grow(len(path) + 16)
	for {
		segment, rest, more := strings.Cut(path, "/")
		b.WriteByte('/')
		b.WriteString(segmentLabel(segment))
		if !more {
			return b.String()
		}
		path = rest
	}
}

// segmentLabel is a path segment as Endpoint writes it.
func segmentLabel(s string) string {
	switch {
	case literalSegments[s]:
		return s
	case strings.HasPrefix(s, "!"):
		return "{roomId}"
	case strings.HasPrefix(s, "$"):
		return "{eventId}"
	case strings.HasPrefix(s, "@"):
		return "{userId}"
	case strings.HasPrefix(s, "#"):
		return "{alias}"
	case s == "":
		return ""
	default:
		return "{id}"
	}
}
