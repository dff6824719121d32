package bridge

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"html"
	"reflect"
	"strings"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// noticeText is a bot notice: a plain-text body and its HTML rendering.
type noticeText struct {
	Plain string
	HTML  string
}

// Markup of bot notices. Only the format string is interpreted, never the values inserted into it.
const (
	markupCode = "`"    // `text` → <code>text</code>; the plain body keeps the backticks
	markupBold = "**"   // **text** → <strong>text</strong>; dropped from the plain body
	markupItem = "- "   // a line starting with "- " is a list item
	htmlBreak  = "<br>" // between lines that are not list items
)

// renderNotice renders a notice written in ferry's small markup: `code`, **bold**, and lines starting with "- "
// as list items. Values are formatted into the result as text: they are HTML-escaped and never interpreted as
// markup, so room names, user IDs and command arguments cannot inject formatting or links.
func renderNotice(format string, args ...any) noticeText {
	htmlFormat, plainFormat := convertMarkup(format)
	escaped := make([]any, len(args))
	for i, a := range args {
		escaped[i] = escapeArg(a)
	}
	return noticeText{Plain: fmt.Sprintf(plainFormat, args...), HTML: fmt.Sprintf(htmlFormat, escaped...)}
}

// join appends other as further lines.
func (n noticeText) join(other noticeText) noticeText {
	if n.Plain == "" {
		return other
	}
	sep := htmlBreak
	switch {
	case strings.HasSuffix(n.HTML, "</ul>") && strings.HasPrefix(other.HTML, "<ul>"):
		// Items joined one by one make one list, not a list per item.
		return noticeText{Plain: n.Plain + "\n" + other.Plain, HTML: strings.TrimSuffix(n.HTML, "</ul>") + strings.TrimPrefix(other.HTML, "<ul>")}
	case strings.HasSuffix(n.HTML, "</ul>") || strings.HasPrefix(other.HTML, "<ul>"):
		sep = ""
	}
	return noticeText{Plain: n.Plain + "\n" + other.Plain, HTML: n.HTML + sep + other.HTML}
}

// escapeArg makes a value safe to format into HTML. Numbers and booleans are kept (so %d and %t still work);
// everything else is formatted with %v and escaped.
func escapeArg(a any) any {
	if a == nil {
		return a
	}
	switch reflect.TypeOf(a).Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Float32, reflect.Float64:
		return a
	}
	return html.EscapeString(fmt.Sprint(a))
}

// convertMarkup turns a format in ferry's markup into an HTML format and a plain-text format. Both keep every
// fmt verb unchanged.
func convertMarkup(format string) (htmlFormat, plainFormat string) {
	var h, p strings.Builder
	inList := false
	for i, line := range strings.Split(format, "\n") {
		item, isItem := strings.CutPrefix(line, markupItem)
		switch {
		case isItem && !inList:
			h.WriteString("<ul>")
			inList = true
		case !isItem && inList:
			h.WriteString("</ul>")
			inList = false
		case !isItem && i > 0:
			h.WriteString(htmlBreak)
		}
		if i > 0 {
			p.WriteByte('\n')
		}
		if isItem {
			h.WriteString("<li>")
			p.WriteString(markupItem)
			convertInline(&h, &p, item)
			h.WriteString("</li>")
		} else {
			convertInline(&h, &p, line)
		}
	}
	if inList {
		h.WriteString("</ul>")
	}
	return h.String(), p.String()
}

// convertInline converts `code` and **bold** spans of one line. Unclosed spans end with the line.
func convertInline(h, p *strings.Builder, line string) {
	code, bold := false, false
	for len(line) > 0 {
		next := strings.IndexAny(line, "`*")
		if next < 0 {
			h.WriteString(html.EscapeString(line))
			p.WriteString(line)
			break
		}
		h.WriteString(html.EscapeString(line[:next]))
		p.WriteString(line[:next])
		line = line[next:]
		switch {
		case strings.HasPrefix(line, markupCode):
			if code {
				h.WriteString("</code>")
			} else {
				h.WriteString("<code>")
			}
			code = !code
			p.WriteString(markupCode)
			line = line[len(markupCode):]
		case !code && strings.HasPrefix(line, markupBold):
			if bold {
				h.WriteString("</strong>")
			} else {
				h.WriteString("<strong>")
			}
			bold = !bold
			line = line[len(markupBold):]
		default: // a lone '*', or "**" inside code
			h.WriteByte('*')
			p.WriteByte('*')
			line = line[1:]
		}
	}
	if code {
		h.WriteString("</code>")
	}
	if bold {
		h.WriteString("</strong>")
	}
}

// sendRenderedNotice posts an m.notice from the bot with a plain body and HTML, encrypted in encrypted rooms,
// optionally as a reply. It mentions nobody. An empty txnID gets a random one.
func (b *Bridge) sendRenderedNotice(ctx context.Context, room id.RoomID, n noticeText, replyTo id.EventID, txnID string) (id.EventID, error) {
	msg := event.MessageEventContent{
		MsgType:       event.MsgNotice,
		Body:          n.Plain,
		Format:        event.FormatHTML,
		FormattedBody: n.HTML,
		Mentions:      &event.Mentions{},
	}
	if replyTo != "" {
		msg.RelatesTo = (&event.RelatesTo{}).SetReplyTo(replyTo)
	}
	if txnID == "" {
		txnID = "ferry_notice_" + randomHex(12)
	}
	encrypted, err := b.StateStore.IsEncrypted(ctx, room)
	if err != nil {
		return "", fmt.Errorf("failed to check whether the room is encrypted: %w", err)
	}
	return b.send(ctx, b.AS.BotIntent(), room, encrypted, event.EventMessage, &event.Content{Parsed: &msg}, txnID, disappearInfo{})
}

// randomHex returns n random bytes, hex-encoded.
func randomHex(n int) string {
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	return hex.EncodeToString(buf)
}
