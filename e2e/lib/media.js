// Encrypted attachments as Matrix clients make them (AES-256-CTR, v2 `file` objects), for relay tests.
import crypto from "node:crypto";

/** Encrypts data and returns { ciphertext, file } where file lacks `url` (set it after uploading). */
export function encryptAttachment(data) {
    const key = crypto.randomBytes(32);
    const iv = Buffer.concat([crypto.randomBytes(8), Buffer.alloc(8)]);
    const cipher = crypto.createCipheriv("aes-256-ctr", key, iv);
    const ciphertext = Buffer.concat([cipher.update(data), cipher.final()]);
    const file = {
        v: "v2",
        key: { kty: "oct", key_ops: ["encrypt", "decrypt"], alg: "A256CTR", k: key.toString("base64url"), ext: true },
        iv: iv.toString("base64").replace(/=+$/, ""),
        hashes: { sha256: crypto.createHash("sha256").update(ciphertext).digest("base64").replace(/=+$/, "") },
    };
    return { ciphertext, file };
}

/** Verifies the hash and decrypts an attachment. */
export function decryptAttachment(ciphertext, file) {
    const hash = crypto.createHash("sha256").update(ciphertext).digest("base64").replace(/=+$/, "");
    if (hash !== file.hashes.sha256) throw new Error("attachment hash mismatch");
    const key = Buffer.from(file.key.k, "base64url");
    const iv = Buffer.from(file.iv, "base64");
    const decipher = crypto.createDecipheriv("aes-256-ctr", key, iv);
    return Buffer.concat([decipher.update(ciphertext), decipher.final()]);
}

/** Uploads bytes as the user and returns the mxc URI. */
export async function upload(user, bytes) {
    const res = await fetch(`${user.hsUrl}/_matrix/media/v3/upload`, {
        method: "POST",
        headers: { Authorization: `Bearer ${user.accessToken}`, "Content-Type": "application/octet-stream" },
        body: bytes,
    });
    if (!res.ok) throw new Error(`upload failed: ${res.status} ${await res.text()}`);
    return (await res.json()).content_uri;
}

/** Downloads an mxc URI as the user (authenticated media, falling back to the legacy endpoint). */
export async function download(user, mxc) {
    const [server, mediaId] = mxc.slice("mxc://".length).split("/");
    for (const path of [`/_matrix/client/v1/media/download/${server}/${mediaId}`, `/_matrix/media/v3/download/${server}/${mediaId}`]) {
        const res = await fetch(user.hsUrl + path, { headers: { Authorization: `Bearer ${user.accessToken}` } });
        if (res.ok) return Buffer.from(await res.arrayBuffer());
    }
    throw new Error(`download of ${mxc} failed`);
}
