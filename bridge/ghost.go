package bridge

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"maunium.net/go/mautrix/id"
)

// Ghost localparts are the namer's prefix followed by the real user's full Matrix ID (without the leading '@')
// in an encoding that only uses the characters Matrix allows in a localpart (a-z 0-9 . _ = - /), one byte at a
// time:
//
//	a-z 0-9 . -    themselves                  alice          -> alice
//	_              doubled                     john_doe       -> john__doe
//	A-Z            '_' + the lower-case letter Alice          -> _alice
//	any other byte '=' + two lower-case hex    ':' -> =3a, '=' -> =3d, '/' -> =2f, 'é' -> =c3=a9
//
// so @alice:example.org becomes @_ferry_alice=3aexample.org:<domain>. The encoding is a bijection between byte
// strings and canonical encodings: after '=' always come two hex digits and after '_' always '_' or a letter, and
// decoding accepts only what encoding produces (it re-encodes and compares), so two ghosts never stand for the
// same user. '/' is escaped even though localparts allow it, because it breaks URL paths in some proxies.
//
// A Matrix ID may be up to 255 bytes and the encoding can triple a byte, so some IDs cannot get a reversible
// ghost. GhostChecked reports that; Ghost then falls back to a hashed ghost (see ghostHashMarker).
const (
	// ghostEscape introduces a hex-escaped byte in a ghost localpart.
	ghostEscape = '='
	// ghostUpper introduces an upper-case letter; doubled it stands for itself.
	ghostUpper = '_'
	// ghostHashMarker follows the prefix of a hashed ghost (prefix + "==" + hex SHA-256 of the real ID). Canonical
	// encodings never contain "==" (an escape is always followed by hex digits), so hashed ghosts can't collide
	// with reversible ones.
	ghostHashMarker = "=="
	// maxUserIDLength is the spec's limit on the length of a full user ID, in bytes.
	maxUserIDLength = 255
)

// ErrInvalidUserID is returned by GhostNamer.GhostChecked when the input is not a Matrix user ID
// (@localpart:server, at most 255 bytes). Callers should not relay for such a sender.
var ErrInvalidUserID = errors.New("not a valid Matrix user ID")

// ErrGhostTooLong is returned by GhostNamer.GhostChecked when the encoded ghost ID would exceed 255 bytes.
// Ghost still returns a usable (hashed, irreversible) ghost for such users.
var ErrGhostTooLong = errors.New("ghost user ID would be too long")

// GhostNamer maps real users to ghosts and back. Deterministic and reversible (see the encoding above).
type GhostNamer struct {
	Prefix    string    // localpart prefix of every ghost, e.g. "_ferry_"
	Domain    string    // server name of the ghosts (ferry's homeserver)
	BotUserID id.UserID // ferry's bot, which is ferry's own but not a ghost
}

// Ghost returns the ghost that stands for real. It never fails: when real can't be encoded reversibly (not a user
// ID, or too long, see GhostChecked) it returns a hashed ghost, which IsGhost recognises but Real can't reverse.
func (gn GhostNamer) Ghost(real id.UserID) id.UserID {
	ghost, err := gn.GhostChecked(real)
	if err != nil {
		sum := sha256.Sum256([]byte(real))
		return gn.userID(gn.Prefix + ghostHashMarker + hex.EncodeToString(sum[:]))
	}
	return ghost
}

// GhostChecked returns the reversible ghost of real: @<prefix><encoded real ID without '@'>:<domain>.
// It fails with ErrInvalidUserID or ErrGhostTooLong, or when the prefix isn't a valid localpart.
func (gn GhostNamer) GhostChecked(real id.UserID) (id.UserID, error) {
	if !validRealUserID(string(real)) {
		return "", ErrInvalidUserID
	}
	localpart := gn.Prefix + encodeGhostPart(string(real)[1:])
	if !validLocalpart(localpart) {
		return "", fmt.Errorf("ghost prefix %q is not a valid localpart", gn.Prefix)
	}
	ghost := gn.userID(localpart)
	if len(ghost) > maxUserIDLength {
		return "", fmt.Errorf("%w: %d bytes", ErrGhostTooLong, len(ghost))
	}
	return ghost, nil
}

// Real returns the real user a ghost stands for. ok is false when u isn't a ghost of this namer, or is a hashed
// ghost (whose real user can't be recovered).
func (gn GhostNamer) Real(ghost id.UserID) (real id.UserID, ok bool) {
	localpart, ok := gn.ghostLocalpart(ghost)
	if !ok {
		return "", false
	}
	decoded, ok := decodeGhostPart(localpart[len(gn.Prefix):])
	if !ok || !validRealUserID("@"+decoded) {
		return "", false
	}
	return id.UserID("@" + decoded), true
}

// IsGhost reports whether u lies in this namer's ghost namespace (@<prefix>…:<domain>, what the appservice
// registration claims exclusively), whether or not it decodes. Anything there is ferry's own: treating it as
// a real user could relay ferry's echoes back.
func (gn GhostNamer) IsGhost(u id.UserID) bool {
	_, ok := gn.ghostLocalpart(u)
	return ok
}

// IsOwn reports whether u is one of ferry's own users: a ghost or the bot.
func (gn GhostNamer) IsOwn(u id.UserID) bool {
	return (gn.BotUserID != "" && u == gn.BotUserID) || gn.IsGhost(u)
}

// Counterpart returns who stands for u on the other side of a link: a real user's ghost, or the real user a
// ghost stands for; ferry's other users (the bot, hashed ghosts) stay themselves.
func (gn GhostNamer) Counterpart(u id.UserID) id.UserID {
	if real, ok := gn.Real(u); ok {
		return real
	}
	if gn.IsOwn(u) {
		return u
	}
	return gn.Ghost(u)
}

func (gn GhostNamer) userID(localpart string) id.UserID {
	return id.UserID("@" + localpart + ":" + gn.Domain)
}

// ghostLocalpart returns u's localpart if u is in the ghost namespace.
func (gn GhostNamer) ghostLocalpart(u id.UserID) (string, bool) {
	s := string(u)
	suffix := ":" + gn.Domain
	if !strings.HasPrefix(s, "@"+gn.Prefix) || !strings.HasSuffix(s, suffix) || len(s) < 1+len(gn.Prefix)+len(suffix) {
		return "", false
	}
	localpart := s[1 : len(s)-len(suffix)]
	if strings.IndexByte(localpart, ':') >= 0 {
		return "", false
	}
	return localpart, true
}

// validRealUserID checks the shape ferry needs to name a ghost: '@', a non-empty localpart, ':', a non-empty
// server name, at most 255 bytes. Historical user IDs may contain any other byte; the encoding copes.
func validRealUserID(s string) bool {
	if len(s) > maxUserIDLength || len(s) < 4 || s[0] != '@' {
		return false
	}
	colon := strings.IndexByte(s, ':')
	return colon > 1 && colon < len(s)-1
}

// validLocalpart checks the characters the spec allows in new user IDs' localparts.
func validLocalpart(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("._=-/", c) >= 0) {
			return false
		}
	}
	return s != ""
}

const lowerHex = "0123456789abcdef"

func encodeGhostPart(s string) string {
	var b strings.Builder
	b.Grow(len(s) + len(s)/4)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '.', c == '-':
			b.WriteByte(c)
		case c == ghostUpper:
			b.WriteString("__")
		case c >= 'A' && c <= 'Z':
			b.WriteByte(ghostUpper)
			b.WriteByte(c - 'A' + 'a')
		default:
			b.WriteByte(ghostEscape)
			b.WriteByte(lowerHex[c>>4])
			b.WriteByte(lowerHex[c&0x0f])
		}
	}
	return b.String()
}

// decodeGhostPart reverses encodeGhostPart. It accepts only canonical encodings.
func decodeGhostPart(s string) (string, bool) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '.', c == '-':
			out = append(out, c)
		case c == ghostUpper && i+1 < len(s) && s[i+1] == ghostUpper:
			out = append(out, ghostUpper)
			i++
		case c == ghostUpper && i+1 < len(s) && s[i+1] >= 'a' && s[i+1] <= 'z':
			out = append(out, s[i+1]-'a'+'A')
			i++
		case c == ghostEscape && i+2 < len(s) && isLowerHex(s[i+1]) && isLowerHex(s[i+2]):
			out = append(out, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		default:
			return "", false
		}
	}
	decoded := string(out)
	if encodeGhostPart(decoded) != s {
		return "", false // e.g. "=61" for 'a': valid hex, but not what Ghost would produce
	}
	return decoded, true
}

func isLowerHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f'
}

func unhex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'a' + 10
}
