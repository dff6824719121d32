package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"regexp"
	"strings"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// OriginKey is the content key of the origin marker ferry puts in every relayed content: which event a copy was
// made from, so that ferry recognises its own copies when it reads a room back (reconcile.go).
// Its value is {"event_id": "$src", "room_id": "!src", "instance": "<appservice id>@<domain>"}.
const OriginKey = "im.ferry.origin"

// ferryKeyPrefix starts every content key that is ferry's own (the origin marker, the transaction marker, ...).
// Such keys are removed from every copy of a user's content and never trusted from it: any user can write them.
const ferryKeyPrefix = "im.ferry."

// Origin is the value of the origin marker: which event a copy was made from, and by which ferry instance.
// TrustFlag is not part of the marker: when set, Translate marks the copy as coming from a sender the source
// room's clients would flag (see markUntrusted).
type Origin struct {
	EventID   id.EventID `json:"event_id"`
	RoomID    id.RoomID  `json:"room_id"`
	Instance  string     `json:"instance"`
	TrustFlag string     `json:"-"`
}

// SenderTrustKey is the content key ferry adds to the copy of a message its source room's clients would flag:
// {"flag": "<reason>", "warning": "<the words prefixed to the body>"}. Reasons are unsigned_device,
// unknown_device, sender_key_mismatch, untrusted_forwarded_key, identity_changed and blacklisted_device.
const SenderTrustKey = "im.ferry.sender_trust"

// untrustedWarnings are the words a flagged copy's body starts with, by reason.
var untrustedWarnings = map[string]string{
	"unsigned_device":         "sent from a device its owner has not verified",
	"unknown_device":          "sent from an unknown or deleted device",
	"sender_key_mismatch":     "the sender's device keys do not match",
	"untrusted_forwarded_key": "its key came from an untrusted forward",
	"identity_changed":        "the sender's identity changed",
	"blacklisted_device":      "sent from a blocked device",
}

// untrustedWarning renders the visible warning for a reason.
func untrustedWarning(flag string) string {
	w, ok := untrustedWarnings[flag]
	if !ok {
		w = "the sender's device is not trusted"
	}
	return "⚠️ [" + w + "] "
}

// markUntrusted marks a copy whose sender the source room's clients would flag: the body (and HTML body) of a
// message or sticker start with a warning, also inside an edit's m.new_content, and every copy carries the
// reason under SenderTrustKey.
func markUntrusted(evtType event.Type, content map[string]any, flag string) {
	warning := untrustedWarning(flag)
	if evtType == event.EventMessage || evtType == event.EventSticker {
		prefixBody(content, warning)
		if newContent, ok := content[keyNewContent].(map[string]any); ok {
			prefixBody(newContent, warning)
		}
	}
	content[SenderTrustKey] = map[string]any{"flag": flag, "warning": warning}
}

// prefixBody puts text before a content's body and, when it has one, its HTML body.
func prefixBody(content map[string]any, text string) {
	if body, ok := content[keyBody].(string); ok {
		content[keyBody] = text + body
	}
	if format, _ := content[keyFormat].(string); format == string(event.FormatHTML) {
		if html, ok := content[keyFormattedBody].(string); ok {
			content[keyFormattedBody] = "<strong>" + htmlEscaper.Replace(text) + "</strong>" + html
		}
	}
}

var htmlEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")

// ErrNotRelayable is returned by Translate for events that must not cross a link: state events, redactions
// (the caller redacts copies through its own event map), m.room.encrypted events that were not decrypted,
// in-room verification requests, event types ferry does not relay, and malformed content.
// Callers should drop the event silently (it is not a failure to report to the room).
var ErrNotRelayable = errors.New("event does not cross a link")

// ErrRelationTargetUnknown is returned by Translate for events whose whole meaning is a relation to an event
// ferry never relayed into the target room: edits, reactions, poll responses and poll ends. Sending them as a
// standalone message would duplicate or garble the conversation, so callers should drop the event.
var ErrRelationTargetUnknown = errors.New("relation target was never relayed")

// Mapper looks up event IDs across a link for one target room (Resolve reads through it).
type Mapper interface {
	// CopyOf returns the ID of sourceEvent's counterpart in the target room: the relayed copy if sourceEvent
	// originated elsewhere, or the original if the target room is where it originated (copies map back to their
	// original). ok=false when ferry never relayed it.
	CopyOf(ctx context.Context, sourceEvent id.EventID) (target id.EventID, ok bool, err error)
}

// PredecessorMapper is implemented by Mappers whose target room replaced other rooms (room upgrades): what ferry
// relayed before an upgrade has its counterpart in the old room, which events in the target room cannot point at.
type PredecessorMapper interface {
	// CopyInPredecessor returns a link to sourceEvent's counterpart in a room the target room replaced, or nil
	// when there is none.
	CopyInPredecessor(ctx context.Context, sourceEvent id.EventID) (*id.MatrixURI, error)
}

// Content keys and values Translate reads or rewrites.
const (
	keyRelatesTo     = "m.relates_to"
	keyInReplyTo     = "m.in_reply_to"
	keyNewContent    = "m.new_content"
	keyMentions      = "m.mentions"
	keyMentionsUsers = "user_ids"
	keyEventID       = "event_id"
	keyRelType       = "rel_type"
	keyFallingBack   = "is_falling_back"
	keyMsgType       = "msgtype"
	keyBody          = "body"
	keyFormat        = "format"
	keyFormattedBody = "formatted_body"
)

// eventKind is how Translate treats an event type.
type eventKind int

const (
	kindNone eventKind = iota
	// kindMessage: messages, stickers and poll starts. They stand on their own, so a relation to an event that
	// was never relayed (reply, thread, reference) is dropped and the message sent without it.
	kindMessage
	// kindReaction: m.reaction, which needs its m.annotation target.
	kindReaction
	// kindPollFollowUp: poll responses and ends, which need their m.reference target (the poll start).
	kindPollFollowUp
	// kindCall: 1:1 VoIP signalling, passed through untouched but for the origin marker.
	kindCall
)

func kindOf(t event.Type) eventKind {
	switch t.Type {
	case event.EventMessage.Type, event.EventSticker.Type,
		event.EventUnstablePollStart.Type, "m.poll.start":
		return kindMessage
	case event.EventReaction.Type:
		return kindReaction
	case event.EventUnstablePollResponse.Type, event.EventUnstablePollEnd.Type, "m.poll.response", "m.poll.end":
		return kindPollFollowUp
	}
	if isCallNotification(t) {
		// Group call ringing stands on its own: its reference to a call member event in the source room is dropped.
		return kindMessage
	}
	if strings.HasPrefix(t.Type, "m.call.") {
		return kindCall
	}
	return kindNone
}

// Refs is what the copy of an event in one target room depends on outside the event itself, read before it is
// translated (Resolve), so that Translate is a pure function of the event and its Refs.
type Refs struct {
	// Events holds the counterparts in the target room (see Mapper.CopyOf) of the events the content relates
	// to: its relation's target and the event it replies to, by source event ID. An event ferry never relayed
	// into the target room is absent.
	Events map[id.EventID]id.EventID
	// ReplyElsewhere links to the counterpart of the event the content replies to in a room the target room
	// replaced (room upgrades), when the target room has none; nil otherwise.
	ReplyElsewhere *id.MatrixURI
	// Ghosts names the link's ghosts: mentions and user pills map through GhostNamer.Counterpart.
	Ghosts GhostNamer
}

// Resolve reads, for one target room, what Translate needs to know about the events src refers to: the
// counterparts (through m) of its relation's target and of the event it replies to, and, when m is also a
// PredecessorMapper and the reply's target has no counterpart in the target room, where it has one in a room
// the target room replaced. Events Translate refuses before looking at their relations need no reads.
//
// Its errors are m's, wrapped; they are worth retrying. No error message contains message content.
func Resolve(ctx context.Context, src *event.Event, m Mapper, ghosts GhostNamer) (Refs, error) {
	refs := Refs{Ghosts: ghosts}
	if src == nil || !mayRelate(&src.Content) {
		return refs, nil // most messages: nothing to read, and no need to decode the content to know it
	}
	_, _, raw, err := translatable(src)
	if err != nil {
		return refs, nil
	}
	rel, ok := raw[keyRelatesTo].(map[string]any)
	if !ok {
		return refs, nil
	}
	var replyTo id.EventID
	if irt, ok := rel[keyInReplyTo].(map[string]any); ok {
		replyTo = eventIDIn(irt[keyEventID])
	}
	for _, evt := range [2]id.EventID{eventIDIn(rel[keyEventID]), replyTo} {
		if _, done := refs.Events[evt]; evt == "" || done {
			continue
		}
		target, ok, err := m.CopyOf(ctx, evt)
		if err != nil {
			return refs, fmt.Errorf("failed to look up the counterpart of %s: %w", evt, err)
		} else if ok && target != "" {
			if refs.Events == nil {
				refs.Events = make(map[id.EventID]id.EventID, 2)
			}
			refs.Events[evt] = target
		}
	}
	if pm, ok := m.(PredecessorMapper); ok && replyTo != "" && refs.Events[replyTo] == "" {
		if refs.ReplyElsewhere, err = pm.CopyInPredecessor(ctx, replyTo); err != nil {
			return refs, fmt.Errorf("failed to look up the counterpart of %s in an upgraded room: %w", replyTo, err)
		}
	}
	return refs, nil
}

// mayRelate tells whether content can hold an m.relates_to key, without decoding it: content as received or
// decrypted (VeryRaw) that spells neither the key nor any \u escape (the only way JSON can write the key's
// characters otherwise) holds none.
func mayRelate(c *event.Content) bool {
	return c.VeryRaw == nil || bytes.Contains(c.VeryRaw, relatesToBytes) || bytes.Contains(c.VeryRaw, unicodeEscapeBytes)
}

var (
	relatesToBytes     = []byte(keyRelatesTo)
	unicodeEscapeBytes = []byte(`\u`)
)

// eventIDIn returns the event ID a content value names: a string starting with "$", else "".
func eventIDIn(v any) id.EventID {
	if s, _ := v.(string); strings.HasPrefix(s, "$") {
		return id.EventID(s)
	}
	return ""
}

// Translate turns a decrypted source event into the content to send in one target room: event IDs in
// relations point at their counterparts in the target room, mentions and user pills at who stands for the
// user there, reply fallbacks are stripped, keys in ferry's own namespace (im.ferry.*) are removed and the
// origin marker is added. Everything else in the content, including keys ferry does not know and encrypted
// attachments, is kept as it was. What it knows about the target room comes from refs (Resolve): Translate
// reads nothing else, and returns the same for the same input.
//
// It reads src.Content.VeryRaw (the content as received or decrypted) when set, else Parsed with Raw merged
// over it. It never mutates src. The returned content has Raw (numbers as float64, like mautrix's own parsing)
// and VeryRaw (the same content as JSON, for ParseRaw) set, and no Parsed.
//
// Errors: ErrNotRelayable and ErrRelationTargetUnknown (both mean: drop the event). No error message contains
// message content.
func Translate(src *event.Event, refs Refs, origin Origin) (evtType event.Type, content *event.Content, err error) {
	evtType, kind, raw, err := translatable(src)
	if err != nil {
		return evtType, nil, err
	}
	stripFerryKeys(raw)
	tr := translator{refs: &refs, standalone: kind == kindMessage, res: &translateResult{}}
	switch kind {
	case kindMessage:
		err = tr.message(evtType, raw)
	case kindReaction, kindPollFollowUp:
		_, err = tr.relation(raw)
	case kindCall:
		// Call IDs and party IDs are mapped by the call relay, not here.
	}
	if err != nil {
		return evtType, nil, err
	}
	if origin.TrustFlag != "" {
		markUntrusted(evtType, raw, origin.TrustFlag)
	}
	raw[OriginKey] = origin.raw()
	data, err := json.Marshal(raw)
	if err != nil {
		return evtType, nil, fmt.Errorf("failed to marshal translated content: %w", err)
	}
	return evtType, &event.Content{VeryRaw: data, Raw: raw}, nil
}

// translatable refuses what Translate never relays, before anything in the content is looked up: no event, state
// events, event types ferry does not relay, content that is not a JSON object, messages without msgtype or that
// are in-room verification requests, and reactions and poll follow-ups without their relation. Otherwise it
// returns the type of the copy, how Translate treats the event, and a fresh copy of its content.
func translatable(src *event.Event) (evtType event.Type, kind eventKind, raw map[string]any, err error) {
	if src == nil {
		return event.Type{}, kindNone, nil, fmt.Errorf("%w: no event", ErrNotRelayable)
	}
	evtType = event.Type{Type: src.Type.Type, Class: event.MessageEventType}
	if src.StateKey != nil || src.Type.Class == event.StateEventType {
		return evtType, kindNone, nil, fmt.Errorf("%w: state event %s", ErrNotRelayable, src.Type.Type)
	}
	kind = kindOf(src.Type)
	if kind == kindNone {
		// Includes m.room.redaction (redacted through the event map) and m.room.encrypted (not decrypted).
		return evtType, kind, nil, fmt.Errorf("%w: event type %s", ErrNotRelayable, src.Type.Type)
	}
	raw, err = contentMap(&src.Content)
	if err != nil {
		return evtType, kind, nil, fmt.Errorf("%w: %s content is not a JSON object", ErrNotRelayable, src.Type.Type)
	}
	switch kind {
	case kindMessage:
		if evtType != event.EventMessage {
			break
		}
		msgType, _ := raw[keyMsgType].(string)
		if msgType == "" {
			return evtType, kind, nil, fmt.Errorf("%w: message without msgtype", ErrNotRelayable)
		} else if msgType == string(event.MsgVerificationRequest) {
			// An in-room verification request is addressed to one user's devices; a ghost can't answer it.
			return evtType, kind, nil, fmt.Errorf("%w: in-room verification request", ErrNotRelayable)
		}
	case kindReaction, kindPollFollowUp:
		// Nothing without their relation: m.annotation for reactions, m.reference (the poll start) for the others.
		relType := event.RelAnnotation
		if kind == kindPollFollowUp {
			relType = event.RelReference
		}
		rel, _ := raw[keyRelatesTo].(map[string]any)
		if t, _ := rel[keyRelType].(string); t != string(relType) {
			return evtType, kind, nil, fmt.Errorf("%w: %s without an %s relation", ErrNotRelayable, evtType.Type, relType)
		}
	}
	return evtType, kind, raw, nil
}

// stripFerryKeys removes ferry's own keys (ferryKeyPrefix) from a user's content and from its m.new_content: only
// ferry writes them, and only into what it sends itself.
func stripFerryKeys(content map[string]any) {
	for key := range content {
		if strings.HasPrefix(key, ferryKeyPrefix) {
			delete(content, key)
		}
	}
	if newContent, ok := content[keyNewContent].(map[string]any); ok {
		stripFerryKeys(newContent)
	}
}

// OriginOf reads the origin marker from any (decrypted) content, or returns nil when there is none. A marker
// whose fields are missing or not strings still counts (the fields are left empty): its presence is what marks
// a copy.
func OriginOf(content *event.Content) *Origin {
	if content == nil {
		return nil
	}
	if v, ok := content.Raw[OriginKey]; ok {
		return originFrom(v)
	}
	for i, src := range [2]any{content.VeryRaw, content.Parsed} {
		var data []byte
		if i == 0 {
			// A marker is a key spelled as ferry writes it; content without those bytes has none, and most
			// content (every message from a real user) is ruled out without decoding it.
			if !bytes.Contains(content.VeryRaw, originKeyBytes) {
				continue
			}
			data = content.VeryRaw
		} else {
			if parsedCannotHoldOrigin(content.Parsed) {
				continue
			}
			data = marshalParsed(src)
		}
		if len(data) == 0 {
			continue
		}
		var probe map[string]json.RawMessage
		if json.Unmarshal(data, &probe) == nil {
			if v, ok := probe[OriginKey]; ok {
				return originFrom(v)
			}
		}
	}
	return nil
}

var originKeyBytes = []byte(`"` + OriginKey + `"`)

// parsedCannotHoldOrigin tells whether a Parsed content is one of mautrix's event content structs: none of them
// has a field for the origin marker, so marshalling one to look for it would only cost time.
func parsedCannotHoldOrigin(parsed any) bool {
	if parsed == nil {
		return true
	}
	t := reflect.TypeOf(parsed)
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.Kind() == reflect.Struct && t.PkgPath() == mautrixEventPkg
}

var mautrixEventPkg = reflect.TypeFor[event.MessageEventContent]().PkgPath()

func marshalParsed(parsed any) []byte {
	if parsed == nil {
		return nil
	}
	data, _ := json.Marshal(parsed)
	return data
}

func originFrom(v any) *Origin {
	switch o := v.(type) {
	case *Origin:
		if o == nil {
			return nil
		}
		out := *o
		return &out
	case Origin:
		return &o
	}
	data, err := json.Marshal(v)
	if err != nil {
		return nil
	}
	var fields map[string]any
	if json.Unmarshal(data, &fields) != nil || fields == nil {
		return nil
	}
	str := func(key string) string {
		s, _ := fields[key].(string)
		return s
	}
	return &Origin{EventID: id.EventID(str("event_id")), RoomID: id.RoomID(str("room_id")), Instance: str("instance")}
}

func (o Origin) raw() map[string]any {
	return map[string]any{"event_id": string(o.EventID), "room_id": string(o.RoomID), "instance": o.Instance}
}

// contentMap returns a fresh, deep copy of content as a JSON object: VeryRaw when set (the bytes as received or
// decrypted), else Parsed with Raw merged over it. Raw wins, as event.Content documents, and unlike mautrix's
// MarshalJSON, which lets Parsed win and so rewrites e.g. a call's "version": "1" into 1.
func contentMap(c *event.Content) (map[string]any, error) {
	if c.VeryRaw != nil {
		return decodeObject(c.VeryRaw)
	}
	var parts []any
	if c.Parsed != nil {
		parts = append(parts, c.Parsed)
	}
	if c.Raw != nil {
		parts = append(parts, c.Raw)
	}
	out := map[string]any{}
	for _, part := range parts {
		data, err := json.Marshal(part)
		if err != nil {
			return nil, err
		} else if string(data) == "null" {
			continue // a typed nil
		}
		obj, err := decodeObject(data)
		if err != nil {
			return nil, err
		}
		mergeJSONObjects(out, obj)
	}
	return out, nil
}

func decodeObject(data []byte) (map[string]any, error) {
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		return nil, err
	} else if out == nil {
		return nil, errors.New("content is null")
	}
	return out, nil
}

// mergeJSONObjects copies from into into, recursing where both hold an object.
func mergeJSONObjects(into, from map[string]any) {
	for key, value := range from {
		existing, okInto := into[key].(map[string]any)
		nested, okFrom := value.(map[string]any)
		if okInto && okFrom {
			mergeJSONObjects(existing, nested)
		} else {
			into[key] = value
		}
	}
}

// translator carries what one Translate call needs.
type translator struct {
	refs *Refs
	// standalone: the event means something without its relation (kindMessage), so a relation to an event
	// that was never relayed is dropped instead of the event.
	standalone bool
	res        *translateResult
}

// translateResult is what a translation found on the way.
type translateResult struct {
	// replyElsewhere is where the event a reply answers lives when that is a room the target room replaced
	// (room upgrades): the reply then quotes a link to it instead (see quoteReplyElsewhere).
	replyElsewhere *id.MatrixURI
}

// message translates messages, stickers and poll starts (translatable checked their msgtype).
func (tr translator) message(evtType event.Type, content map[string]any) error {
	isReply, err := tr.relation(content)
	if err != nil {
		return err
	}
	tr.text(content, isReply)
	if newContent, ok := content[keyNewContent].(map[string]any); ok {
		// m.new_content never carries a relation (the spec ignores one there); drop it rather than leave a
		// source-room ID behind.
		delete(newContent, keyRelatesTo)
		tr.text(newContent, false)
	}
	if tr.res.replyElsewhere != nil && evtType == event.EventMessage {
		quoteReplyElsewhere(content, tr.res.replyElsewhere)
	}
	return nil
}

// Text of a reply whose target lives in a room the target room replaced (room upgrades).
const (
	replyElsewhereText = "In reply to a message from before this room was upgraded"
	replyElsewhereMark = "↩️ "
)

// quoteReplyElsewhere starts a text message (text, notice, emote) with a link to the event it replies to, in the
// room it lives in. Clients look a reply's target up in the room the reply is in, so an m.in_reply_to naming an
// event of the old room would show "unable to load"; a permalink opens the old room at that event instead. Other
// message types (media, whose body is a file name or caption) go without.
func quoteReplyElsewhere(content map[string]any, link *id.MatrixURI) {
	switch msgType, _ := content[keyMsgType].(string); event.MessageType(msgType) {
	case event.MsgText, event.MsgNotice, event.MsgEmote:
	default:
		return
	}
	url := link.MatrixToURL()
	body, _ := content[keyBody].(string)
	html, hasHTML := content[keyFormattedBody].(string)
	if format, _ := content[keyFormat].(string); format != string(event.FormatHTML) || !hasHTML {
		html = strings.ReplaceAll(htmlEscaper.Replace(body), "\n", "<br>")
	}
	content[keyBody] = replyElsewhereMark + replyElsewhereText + ": " + url + "\n\n" + body
	content[keyFormat] = string(event.FormatHTML)
	content[keyFormattedBody] = "<blockquote>" + replyElsewhereMark + `<a href="` + htmlEscaper.Replace(url) + `">` + replyElsewhereText + "</a></blockquote>" + html
}

// text translates the human-readable parts of a content: reply fallback, mentions and pills.
func (tr translator) text(content map[string]any, isReply bool) {
	stripReplyFallback(content, isReply)
	tr.mentions(content)
	tr.pills(content)
}

// relation remaps m.relates_to. isReply reports whether the source had an m.in_reply_to (so its fallback should
// be stripped), whether or not it survived.
func (tr translator) relation(content map[string]any) (isReply bool, err error) {
	v, ok := content[keyRelatesTo]
	if !ok {
		return false, nil
	}
	rel, ok := v.(map[string]any)
	if !ok {
		delete(content, keyRelatesTo) // not a relation anyone can read, and it might hold a foreign ID
		return false, nil
	}
	_, isReply = rel[keyInReplyTo]
	relType, _ := rel[keyRelType].(string)
	switch event.RelationType(relType) {
	case "":
		// A plain reply. An event_id without rel_type means nothing, but it must not point into the source room.
		if _, present := rel[keyEventID]; present {
			if target, ok := tr.copyOf(rel[keyEventID]); ok {
				rel[keyEventID] = string(target)
			} else {
				delete(rel, keyEventID)
			}
		}
		if tr.reply(rel); len(rel) == 0 {
			delete(content, keyRelatesTo)
		}
		return isReply, nil
	case event.RelThread:
		tr.thread(content, rel)
		return isReply, nil
	}
	if target, ok := tr.copyOf(rel[keyEventID]); ok {
		rel[keyEventID] = string(target)
		tr.reply(rel)
		return isReply, nil
	}
	switch event.RelationType(relType) {
	case event.RelReplace, event.RelAnnotation:
		return isReply, fmt.Errorf("%w: %s target", ErrRelationTargetUnknown, relType)
	case event.RelReference:
		if !tr.standalone {
			return isReply, fmt.Errorf("%w: %s target", ErrRelationTargetUnknown, relType)
		}
	}
	tr.degrade(content, rel)
	return isReply, nil
}

// thread remaps an m.thread relation. If the root was never relayed the message goes out without the thread
// (as a plain reply when it was a genuine reply to an event that was relayed).
func (tr translator) thread(content, rel map[string]any) {
	root, ok := tr.copyOf(rel[keyEventID])
	if !ok {
		tr.degrade(content, rel)
		return
	}
	rel[keyEventID] = string(root)
	v, present := rel[keyInReplyTo]
	if !present {
		return
	}
	var target id.EventID
	irt, isObject := v.(map[string]any)
	if isObject {
		target, ok = tr.copyOf(irt[keyEventID])
	}
	if isObject && ok {
		irt[keyEventID] = string(target)
	} else {
		// Thread-aware clients still render this; others see a reply to the root.
		rel[keyInReplyTo] = map[string]any{keyEventID: string(root)}
		rel[keyFallingBack] = true
	}
}

// reply remaps rel's m.in_reply_to in place, removing it when its target was never relayed.
func (tr translator) reply(rel map[string]any) {
	v, present := rel[keyInReplyTo]
	if !present {
		return
	}
	irt, ok := v.(map[string]any)
	if !ok {
		delete(rel, keyInReplyTo)
		return
	}
	target, ok := tr.copyOf(irt[keyEventID])
	if !ok {
		delete(rel, keyInReplyTo)
		// Where the target lives when that is a room the target room replaced (Resolve looked it up).
		tr.res.replyElsewhere = tr.refs.ReplyElsewhere
		return
	}
	irt[keyEventID] = string(target)
}

// degrade replaces a relation whose target was never relayed by what survives of it: a plain reply when the
// source was a genuine reply (not a thread's fallback) to an event that was relayed, otherwise nothing.
func (tr translator) degrade(content, rel map[string]any) {
	delete(content, keyRelatesTo)
	if fallingBack, _ := rel[keyFallingBack].(bool); fallingBack {
		return
	}
	irt, ok := rel[keyInReplyTo].(map[string]any)
	if !ok {
		return
	}
	plain := map[string]any{keyInReplyTo: irt}
	if tr.reply(plain); len(plain) > 0 {
		content[keyRelatesTo] = plain
	}
}

// copyOf returns the counterpart, as Resolve found it, of an event ID found in content (any JSON value).
func (tr translator) copyOf(v any) (id.EventID, bool) {
	evt := eventIDIn(v)
	if evt == "" {
		return "", false
	}
	target, ok := tr.refs.Events[evt]
	return target, ok && target != ""
}

// mentions maps m.mentions.user_ids through Ghosts.Counterpart, keeping m.mentions (and room) as they were otherwise.
func (tr translator) mentions(content map[string]any) {
	mentions, ok := content[keyMentions].(map[string]any)
	if !ok {
		return
	}
	users, ok := mentions[keyMentionsUsers].([]any)
	if !ok {
		return
	}
	out := make([]any, 0, len(users))
	seen := make(map[string]bool, len(users))
	for _, v := range users {
		if s, ok := v.(string); ok {
			s = string(tr.refs.Ghosts.Counterpart(id.UserID(s)))
			if seen[s] {
				continue // two source users that stand for the same target user
			}
			seen[s] = true
			v = s
		}
		out = append(out, v)
	}
	mentions[keyMentionsUsers] = out
}

// hrefPattern finds the href attribute of <a> tags: group 1 is everything up to the value, group 2 the value
// with its quotes, if any.
var hrefPattern = regexp.MustCompile(`(?i)(<a\s(?:[^>]*?\s)?href\s*=\s*)("[^"]*"|'[^']*'|[^\s"'>]+)`)

// pills rewrites user permalinks (pills) in an HTML formatted_body through Ghosts.Counterpart.
func (tr translator) pills(content map[string]any) {
	if format, _ := content[keyFormat].(string); format != string(event.FormatHTML) {
		return
	}
	html, ok := content[keyFormattedBody].(string)
	if !ok {
		return
	}
	matches := hrefPattern.FindAllStringSubmatchIndex(html, -1)
	if matches == nil {
		return
	}
	var b strings.Builder
	last := 0
	for _, loc := range matches {
		start, end := loc[4], loc[5]
		value := html[start:end]
		quote := ""
		if value[0] == '"' || value[0] == '\'' {
			quote, value = value[:1], value[1:len(value)-1]
		}
		rewritten, ok := tr.permalink(value)
		if !ok {
			continue
		}
		b.WriteString(html[last:start])
		b.WriteString(quote + rewritten + quote)
		last = end
	}
	if last == 0 {
		return
	}
	b.WriteString(html[last:])
	content[keyFormattedBody] = b.String()
}

// User permalink forms ferry rewrites: matrix.to links (https://matrix.to/#/@user:server, optionally
// percent-encoded, optionally with a ?query) and matrix: URIs (matrix:u/user:server).
const matrixURIUserPrefix = "matrix:u/"

var permalinkPrefixes = [...]string{"https://matrix.to/#/", "http://matrix.to/#/", matrixURIUserPrefix}

// permalink maps a user permalink to the corresponding one in the target room. ok is false when the value is
// not a user permalink or maps to itself.
func (tr translator) permalink(value string) (string, bool) {
	var prefix, idPart string
	for _, p := range permalinkPrefixes {
		if len(value) >= len(p) && strings.EqualFold(value[:len(p)], p) {
			prefix, idPart = value[:len(p)], value[len(p):]
			break
		}
	}
	if prefix == "" {
		return "", false
	}
	idPart, query, hasQuery := strings.Cut(idPart, "?")
	if strings.ContainsAny(idPart, "/&") {
		return "", false // a room/event permalink, or an HTML entity we'd rather not decode
	}
	decoded, err := url.PathUnescape(idPart)
	if err != nil {
		return "", false
	}
	isURI := strings.EqualFold(prefix, matrixURIUserPrefix)
	if isURI {
		decoded = "@" + decoded
	}
	if !strings.HasPrefix(decoded, "@") || !strings.Contains(decoded, ":") {
		return "", false
	}
	mapped := string(tr.refs.Ghosts.Counterpart(id.UserID(decoded)))
	if mapped == decoded || !strings.HasPrefix(mapped, "@") {
		return "", false
	}
	if isURI {
		mapped = mapped[1:]
	}
	out := prefix + escapeUserID(mapped, strings.Contains(idPart, "%"))
	if hasQuery {
		out += "?" + query
	}
	return out, true
}

// escapeUserID percent-encodes a user ID for a permalink. full encodes everything but RFC 3986 unreserved
// characters (the form matrix.to documents, %40user%3Aserver); otherwise '@', ':' and the other sub-delimiters
// that are safe in a URL fragment stay readable, like clients write them.
func escapeUserID(s string, full bool) string {
	const upperHex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		unreserved := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0
		if unreserved || !full && strings.IndexByte("@:!$+,;=", c) >= 0 {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteByte(upperHex[c>>4])
			b.WriteByte(upperHex[c&0x0f])
		}
	}
	return b.String()
}

// Reply fallbacks (before Matrix v1.13 every reply quoted its target): an <mx-reply> block at the start of an
// HTML formatted_body, and "> "-quoted lines followed by a blank line at the start of body.
const (
	mxReplyOpen  = "<mx-reply>"
	mxReplyClose = "</mx-reply>"
)

// stripReplyFallback removes the reply fallback from a content. The HTML block is always removed (it is never
// meant to be shown). The body's quote is removed when the HTML one was, or, for a reply without HTML, when it
// looks like a fallback ("> <@sender> …" or "> * <@sender> …" and a blank line), so a message that merely
// starts with a quote keeps it.
func stripReplyFallback(content map[string]any, isReply bool) {
	certain := false
	hasHTML := false
	if format, _ := content[keyFormat].(string); format == string(event.FormatHTML) {
		if html, ok := content[keyFormattedBody].(string); ok {
			hasHTML = true
			if stripped, ok := cutReplyFallbackHTML(html); ok {
				content[keyFormattedBody] = stripped
				certain = true
			}
		}
	}
	if !certain && (!isReply || hasHTML) {
		return
	}
	if body, ok := content[keyBody].(string); ok {
		if stripped, ok := cutReplyFallbackText(body, certain); ok {
			content[keyBody] = stripped
		}
	}
}

// cutReplyFallbackHTML removes a leading <mx-reply>…</mx-reply> block (nested blocks included). An unterminated
// block is left alone rather than swallowing the message.
func cutReplyFallbackHTML(html string) (string, bool) {
	if !hasPrefixFold(html, mxReplyOpen) {
		return html, false
	}
	depth := 0
	for i := 0; i < len(html); {
		switch {
		case hasPrefixFold(html[i:], mxReplyOpen):
			depth++
			i += len(mxReplyOpen)
		case hasPrefixFold(html[i:], mxReplyClose):
			depth--
			i += len(mxReplyClose)
			if depth == 0 {
				return html[i:], true
			}
		default:
			i++
		}
	}
	return html, false
}

// cutReplyFallbackText removes the leading quoted lines of a body and the blank line after them. Unless certain,
// the quote must start like a fallback and be followed by a blank line. A body that is nothing but a quote is
// left alone.
func cutReplyFallbackText(body string, certain bool) (string, bool) {
	if !certain && !strings.HasPrefix(body, "> <") && !strings.HasPrefix(body, "> * <") {
		return body, false
	}
	pos := 0
	for pos < len(body) {
		line, _, more := strings.Cut(body[pos:], "\n")
		if !strings.HasPrefix(line, "> ") && line != ">" {
			break
		} else if !more {
			return body, false // the quote runs to the end: nothing would be left
		}
		pos += len(line) + 1
	}
	if pos == 0 {
		return body, false
	}
	rest := body[pos:]
	if after, ok := strings.CutPrefix(rest, "\n"); ok {
		return after, true
	} else if certain {
		return rest, true
	}
	return body, false
}

func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}
