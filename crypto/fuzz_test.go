package crypto

import (
	"encoding/base64"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// FuzzMegolmMessageIndex: the message index ferry reads from a sender's ciphertext (outside input, parsed before
// any key is used) never panics, and a well-formed header gives back its index.
func FuzzMegolmMessageIndex(f *testing.F) {
	header := func(index byte) string {
		msg := append([]byte{3, 0x08, index, 0x12, 4, 'a', 'b', 'c', 'd'}, make([]byte, 8+64)...)
		return base64.RawStdEncoding.EncodeToString(msg)
	}
	f.Add(header(0))
	f.Add(header(5))
	f.Add("AwgAEnA")
	f.Add("")
	f.Add("not base64 !!")
	f.Add(base64.RawStdEncoding.EncodeToString([]byte{3, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}))
	f.Fuzz(func(t *testing.T, ciphertext string) {
		content := &event.EncryptedEventContent{Algorithm: id.AlgorithmMegolmV1, MegolmCiphertext: []byte(ciphertext)}
		_, _ = MegolmMessageIndex(content)
	})
}
