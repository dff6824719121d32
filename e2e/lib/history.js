// A room's server-side history as a member reads it (/messages), and its events decrypted by that member's
// client: what the member sees on scrolling back, whatever the client's live timeline holds (a client that
// missed events in a "limited" sync shows a gap until its user scrolls).
import * as sdk from "matrix-js-sdk";

/** One backward pagination of the room's history with pages of `limit`, oldest first (read with /messages). */
async function paginate(user, roomId, limit) {
    const out = [];
    let from = null;
    for (;;) {
        const res = await user.client.createMessagesRequest(roomId, from, limit, sdk.Direction.Backward);
        out.push(...res.chunk);
        if (!res.end || res.chunk.length === 0 || res.end === from) break;
        from = res.end;
    }
    return out.reverse();
}

/**
 * The room's whole server-side history, oldest first, as raw events, read with /messages by user. Dendrite
 * 0.13.8's backward pagination skips the rest of a group of events that share a depth when a page ends inside the
 * group (and returns another one twice, or a group in another order), so the history is read several times with
 * pages of different sizes and merged (mergeReads).
 */
export async function serverHistory(user, roomId) {
    const reads = await Promise.all([100, 87, 61, 37].map((size) => paginate(user, roomId, size)));
    return mergeReads(reads);
}

/**
 * Merges reads of one history: the first read is the base; an event only a later read has goes between the
 * events that read shows around it (those the merged history has), among the events there by timestamp.
 */
function mergeReads(reads) {
    const merged = [];
    const seen = new Set();
    for (const raw of reads[0]) {
        if (!seen.has(raw.event_id)) {
            seen.add(raw.event_id);
            merged.push(raw);
        }
    }
    for (const read of reads.slice(1)) {
        const ids = read.map((raw) => raw.event_id);
        for (let i = 0; i < read.length; i++) {
            const raw = read[i];
            if (seen.has(raw.event_id)) continue;
            const index = new Map(merged.map((e, k) => [e.event_id, k]));
            let lo = -1; // the merged index of the nearest event before it in this read
            for (let j = i - 1; j >= 0 && lo < 0; j--) lo = index.get(ids[j]) ?? -1;
            let hi = merged.length; // … and after it
            for (let j = i + 1; j < read.length && hi === merged.length; j++) hi = index.get(ids[j]) ?? merged.length;
            if (hi <= lo) hi = lo + 1; // the reads disagree on the order there: right after the one before
            let at = lo + 1;
            while (at < hi && merged[at].origin_server_ts <= raw.origin_server_ts) at++;
            merged.splice(at, 0, raw);
            seen.add(raw.event_id);
        }
    }
    return merged;
}

/** Decrypts raw events with user's client, remembering results; events that fail are tried again next time. */
export function decrypter(user) {
    const clear = new Map(); // event ID -> clear content
    return async (raw) => {
        if (clear.has(raw.event_id)) return clear.get(raw.event_id);
        if (raw.type !== "m.room.encrypted") {
            clear.set(raw.event_id, { type: raw.type, content: raw.content });
            return clear.get(raw.event_id);
        }
        const ev = new sdk.MatrixEvent(structuredClone(raw));
        await user.client.decryptEventIfNeeded(ev);
        if (ev.isDecryptionFailure()) return null;
        clear.set(raw.event_id, { type: ev.getType(), content: ev.getContent() });
        return clear.get(raw.event_id);
    };
}

