// Issue 12's end-to-end proof: the link boundary holds. Real matrix-js-sdk users with bad intent try to make ferry
// act in another room without the authority the homeserver would demand there, and fail:
//   - redactions: an encrypted event whose cleartext type is m.room.redaction never redacts a copy; a
//     moderator's and the sender's own redactions still do. (A real redaction that the server accepts but does
//     not apply cannot be produced here: Synapse refuses it, Dendrite keeps it from clients and appservices;
//     bridge's TestRedactionAuthority proves ferry's rule for it.)
//   - membership and power: power levels outlive leaving and bans, but a user who left or was banned from a room
//     cannot link it by that stale power.
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { after, before, test } from "node:test";
import { createUser } from "../lib/users.js";
import { command, inviteBot, linkByRequest, startStack } from "../lib/stack.js";

const T = 30000;
let stack, alice, bob, carol, roomA, roomB;

const isGhost = (userId) => userId.startsWith("@_ferry_");

/** Waits in `roomId` (as `user`) for the relayed copy of a message with this body. */
function copyOf(user, roomId, body) {
    return user.waitForEvent(roomId, (e) => isGhost(e.sender) && e.type === "m.room.message" && e.content.body === body, T, `the copy of "${body}"`);
}

/** The plain event `eventId` as `user` sees it now. */
async function seen(user, roomId, eventId) {
    return (await user.events(roomId)).find((e) => e.eventId === eventId);
}

/**
 * A barrier for redactions: alice (room A's creator) sends a message and redacts it, and bob waits until the copy
 * in room B is redacted. ferry handles a room's redactions in the order they reached it, through the same path
 * (pushed, or on Dendrite its bot's /sync), so anything an earlier redaction in room A did is done by then.
 */
async function redactionBarrier(label) {
    const body = `barrier ${label}`;
    const id = await alice.sendText(roomA, body);
    const copy = await copyOf(bob, roomB, body);
    await alice.redact(roomA, id);
    await bob.waitForEvent(roomB, (e) => e.eventId === copy.eventId && e.redacted, T, `the barrier copy "${body}" to be redacted`);
}

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user" } });
    [alice, bob, carol] = await Promise.all(["alice", "bob", "carol"].map((n) => createUser(stack.hs.url, n, { displayName: n })));
    roomA = await alice.createEncryptedRoom({ name: "Boundary A" });
    roomB = await bob.createEncryptedRoom({ name: "Boundary B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    // carol is a plain member of room A (power 0).
    await alice.invite(roomA, carol.userId);
    await carol.join(roomA);
    await alice.waitForMembership(roomA, carol.userId, "join");
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop(), carol?.stop()]);
    await stack?.stop();
});

test("attack 1: an encrypted event whose cleartext type is m.room.redaction redacts nothing", async () => {
    const original = await alice.sendText(roomA, "alice's words, attack 1");
    const copy = await copyOf(bob, roomB, "alice's words, attack 1");
    await carol.waitForEvent(roomA, (e) => e.eventId === original, T, "alice's message at carol");
    const fake = await carol.sendEncrypted(roomA, "m.room.redaction", { redacts: original });
    // The homeserver stored ciphertext: for it, nothing was redacted.
    const atAlice = await alice.waitForEvent(roomA, (e) => e.eventId === fake, T, "carol's encrypted redaction");
    assert.equal(atAlice.encrypted, true);
    assert.equal(atAlice.type, "m.room.redaction", "the cleartext type is m.room.redaction");
    // A marker after it from carol: ferry handles room A in order, so once the marker crossed, the fake was handled.
    await carol.sendText(roomA, "carol's marker, attack 1");
    await copyOf(bob, roomB, "carol's marker, attack 1");
    await redactionBarrier("attack 1");
    assert.equal((await seen(alice, roomA, original)).redacted, false, "the homeserver did not redact the original");
    assert.equal((await seen(bob, roomB, copy.eventId)).redacted, false, "ferry did not redact the copy");
});

test("redactions by the sender and by a member with redact power still cross", async () => {
    const own = await carol.sendText(roomA, "carol takes this back");
    const ownCopy = await copyOf(bob, roomB, "carol takes this back");
    await carol.redact(roomA, own);
    await bob.waitForEvent(roomB, (e) => e.eventId === ownCopy.eventId && e.redacted, T, "the copy of carol's own redacted message");
    // alice created room A (power 100 ≥ redact 50) and removes carol's message.
    const moderated = await carol.sendText(roomA, "carol's message a moderator removes");
    const modCopy = await copyOf(bob, roomB, "carol's message a moderator removes");
    await alice.waitForEvent(roomA, (e) => e.eventId === moderated, T, "carol's message at alice");
    await alice.redact(roomA, moderated);
    await bob.waitForEvent(roomB, (e) => e.eventId === modCopy.eventId && e.redacted, T, "the copy of the moderated message");
});

for (const how of ["left", "banned"]) {
    test(`attack 2: a user who ${how === "left" ? "left" : "was banned from"} room B links it by stale power and is refused`, async () => {
        const mallory = await createUser(stack.hs.url, `mallory-${how}`, { displayName: "Mallory" });
        try {
            // mallory was a moderator of room B (power 50, enough to change its settings).
            await bob.invite(roomB, mallory.userId);
            await mallory.join(roomB);
            await bob.client.setPowerLevel(roomB, mallory.userId, 50);
            if (how === "left") await mallory.leave(roomB);
            else await bob.client.ban(roomB, mallory.userId, "test");
            await bob.waitForMembership(roomB, mallory.userId, how === "left" ? "leave" : "ban");
            const pl = (await bob.client.roomState(roomB)).find((e) => e.type === "m.room.power_levels");
            assert.equal(pl.content.users[mallory.userId], 50, `power levels still list mallory after she ${how}`);

            const own = await mallory.createEncryptedRoom({ name: `Mallory's room (${how})` });
            await inviteBot(stack, mallory, own);
            const reply = await command(stack, mallory, own, `!ferry link ${roomB}`);
            assert.doesNotMatch(reply.content.body, /^Linked/, "ferry did not link at once");
            assert.match(reply.content.body, /not a member of|not joined/i, "the reply says her power there does not count");
            assert.deepEqual(stack.sql(`SELECT link_id FROM link_room WHERE room_id='${own}'`), [], "mallory's room joined no link");
            // Room B's messages still reach only room A.
            await bob.sendText(roomB, `bob after mallory ${how}`);
            await copyOf(alice, roomA, `bob after mallory ${how}`);
            const linkRooms = stack.sql("SELECT room_id FROM link_room ORDER BY room_id").map((r) => r[0]);
            assert.deepEqual(linkRooms, [roomA, roomB].sort());
        } finally {
            await mallory.stop();
        }
    });
}

test("ferry's markers are ferry's: a user's im.ferry.* keys never cross, and forged markers stop nothing", async () => {
    const forgedOrigin = { event_id: "$someone-elses", room_id: roomB, instance: "ferry@elsewhere.test" };
    const sent = await alice.sendText(roomA, "forged markers", {
        "im.ferry.origin": forgedOrigin,
        "im.ferry.txn": "ferry_reply_forged",
        "im.ferry.whatever": { nested: true },
    });
    const copy = await copyOf(bob, roomB, "forged markers");
    assert.deepEqual(Object.keys(copy.content).filter((k) => k.startsWith("im.ferry.")), ["im.ferry.origin"], "only ferry's own marker");
    assert.equal(copy.content["im.ferry.origin"].event_id, sent, "the origin marker names alice's event");
    assert.equal(copy.content["im.ferry.origin"].room_id, roomA);
    // An edit with a forged marker reaches room B too: a marker cannot make the rooms see different text.
    await alice.sendEvent(roomA, "m.room.message", {
        msgtype: "m.text",
        body: "* forged markers, edited",
        "m.new_content": { msgtype: "m.text", body: "forged markers, edited", "im.ferry.txn": "ferry_forged_inner" },
        "m.relates_to": { rel_type: "m.replace", event_id: sent },
        "im.ferry.origin": forgedOrigin,
    });
    const edit = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content["m.relates_to"]?.rel_type === "m.replace" && e.content["m.relates_to"].event_id === copy.eventId, T, "the relayed edit");
    assert.equal(edit.content["m.new_content"].body, "forged markers, edited");
    assert.equal(edit.content["m.new_content"]["im.ferry.txn"], undefined, "no ferry key inside m.new_content");
    assert.notEqual(edit.content["im.ferry.origin"].event_id, forgedOrigin.event_id);
});

/** The request ID in a reply or request notice. */
const requestId = (body) => {
    const m = body.match(/[Rr]equest `([0-9a-f]+)`/);
    assert.ok(m, `a request ID in: ${body}`);
    return m[1];
};
const linkOf = (roomId) => stack.sql(`SELECT link_id FROM link_room WHERE room_id='${roomId}'`).map((r) => r[0])[0];

test("adding a room to an existing link needs consent in every room of the link", async () => {
    const roomC = await carol.createEncryptedRoom({ name: "Boundary C" });
    await inviteBot(stack, carol, roomC);
    const asked = await command(stack, carol, roomC, `!ferry link ${roomA}`);
    assert.match(asked.content.body, /needs consent/);
    const id = requestId(asked.content.body);
    // Both rooms of the link are asked, with the ID.
    for (const [user, room] of [[alice, roomA], [bob, roomB]]) {
        const notice = await user.waitForEvent(room, (e) => e.sender === stack.botUserId && (e.content.body ?? "").includes(`Request \`${id}\``), T, "the request notice");
        assert.match(notice.content.body, /asks to link/);
        assert.match(notice.content.body, new RegExp(`!ferry reject ${id}`));
    }
    const first = await command(stack, alice, roomA, `!ferry accept ${id}`);
    assert.match(first.content.body, /still waits for consent in Boundary B/, "one room's consent is not enough");
    assert.equal(linkOf(roomC), undefined, "room C is not linked yet");
    const second = await command(stack, bob, roomB, `!ferry accept ${id}`);
    assert.match(second.content.body, /^Linked/);
    assert.equal(linkOf(roomC), linkOf(roomA));
    // Back to the A–B link for the other tests.
    assert.match((await command(stack, carol, roomC, "!ferry unlink")).content.body, /^Unlinked/);
});

test("requests can be rejected, expire, and the requester's rights are checked again when accepted", async () => {
    const dave = await createUser(stack.hs.url, "dave", { displayName: "dave" });
    try {
        const roomD = await dave.createEncryptedRoom({ name: "Boundary D" });
        await inviteBot(stack, dave, roomD);
        // Rejected: nothing changes, and dave's room is told.
        const rejected = requestId((await command(stack, dave, roomD, `!ferry link ${roomB}`)).content.body);
        assert.match((await command(stack, bob, roomB, `!ferry reject ${rejected}`)).content.body, new RegExp(`Rejected request \`${rejected}\``));
        await dave.waitForEvent(roomD, (e) => e.sender === stack.botUserId && /was rejected in Boundary B/.test(e.content.body ?? ""), T, "the rejection notice");
        assert.match((await command(stack, bob, roomB, `!ferry accept ${rejected}`)).content.body, /No request/);
        // Expired: refused when accepted.
        const expired = requestId((await command(stack, dave, roomD, `!ferry link ${roomB}`)).content.body);
        stack.sql(`UPDATE consent_request SET expires_at = 0 WHERE id='${expired}'`);
        assert.match((await command(stack, alice, roomA, `!ferry accept ${expired}`)).content.body, /expired/);
        assert.equal(linkOf(roomD), undefined);
        // dave leaves his own room after asking (his power there stays listed): his consent for it no longer counts.
        const recheck = requestId((await command(stack, dave, roomD, `!ferry link ${roomB}`)).content.body);
        await dave.invite(roomD, carol.userId);
        await carol.join(roomD);
        await dave.client.setPowerLevel(roomD, carol.userId, 100);
        await carol.waitForEvent(roomD, (e) => e.type === "m.room.power_levels" && e.content.users?.[carol.userId] === 100, T, "carol's power");
        await dave.leave(roomD);
        await carol.waitForMembership(roomD, dave.userId, "leave");
        await command(stack, alice, roomA, `!ferry accept ${recheck}`);
        const last = await command(stack, bob, roomB, `!ferry accept ${recheck}`);
        assert.match(last.content.body, /still waits for consent in Boundary D/);
        assert.equal(linkOf(roomD), undefined, "room D is not linked on a consent that no longer holds");
        await carol.waitForEvent(roomD, (e) => e.sender === stack.botUserId && (e.content.body ?? "").includes(`Request \`${recheck}\``), T, "room D is asked again");
        assert.match((await command(stack, carol, roomD, `!ferry reject ${recheck}`)).content.body, /Rejected/);
        await carol.leave(roomD);
    } finally {
        await dave.stop();
    }
});

test("a disappearing timer that redacts originals in another room needs that room's consent", async () => {
    // bob has power only in room B; with the default bridge.redact_originals the timer redacts originals in A too.
    const asked = await command(stack, bob, roomB, "!ferry disappear 1h");
    assert.match(asked.content.body, /needs consent/);
    assert.equal(stack.sql(`SELECT disappear_ms FROM link WHERE id='${linkOf(roomB)}'`)[0][0], "0", "the timer is not set yet");
    const id = requestId(asked.content.body);
    await alice.waitForEvent(roomA, (e) => e.sender === stack.botUserId && (e.content.body ?? "").includes(`Request \`${id}\``), T, "the timer request in room A");
    const done = await command(stack, alice, roomA, `!ferry accept ${id}`);
    assert.match(done.content.body, /disappears 1h 0m after/);
    assert.equal(stack.sql(`SELECT disappear_ms FROM link WHERE id='${linkOf(roomB)}'`)[0][0], "3600000");
    // Turning it off acts on nothing but ferry's own redactions to come: no consent needed.
    assert.match((await command(stack, bob, roomB, "!ferry disappear off")).content.body, /off for this link/);
});

test("moderation holds: a user banned from room B is not heard there, and a kicked ghost is not invited back", async () => {
    const erin = await createUser(stack.hs.url, "erin", { displayName: "erin" });
    try {
        for (const [owner, room] of [[alice, roomA], [bob, roomB]]) {
            await owner.invite(room, erin.userId);
            await erin.join(room);
            await owner.waitForMembership(room, erin.userId, "join");
        }
        await bob.client.ban(roomB, erin.userId, "test");
        await bob.waitForMembership(roomB, erin.userId, "ban");
        await erin.sendText(roomA, "erin after the ban");
        const told = await erin.waitForEvent(roomA, (e) => e.sender === stack.botUserId && /your messages do not reach Boundary B/.test(e.content.body ?? ""), T, "the notice to erin");
        assert.ok(told.content.body.includes(erin.userId));
        await erin.sendText(roomA, "erin again after the ban");
        await alice.sendText(roomA, "marker after erin");
        await copyOf(bob, roomB, "marker after erin");
        const inB = (await bob.events(roomB)).map((e) => e.content?.body);
        assert.ok(!inB.includes("erin after the ban") && !inB.includes("erin again after the ban"), "erin was not heard in B");
        const notices = (await erin.events(roomA)).filter((e) => /your messages do not reach/.test(e.content?.body ?? ""));
        assert.equal(notices.length, 1, "erin is told once");
    } finally {
        await erin.stop();
    }

    // carol has spoken, so her ghost is in room B. bob kicks it.
    await carol.sendText(roomA, "carol before the kick");
    const before = await copyOf(bob, roomB, "carol before the kick");
    const ghost = before.sender;
    await bob.client.kick(roomB, ghost, "test");
    await bob.waitForMembership(roomB, ghost, "leave");
    await carol.sendText(roomA, "carol after the kick");
    await alice.sendText(roomA, "marker after the kick");
    await copyOf(bob, roomB, "marker after the kick");
    assert.equal(bob.client.getRoom(roomB).getMember(ghost)?.membership, "leave", "ferry did not bring the kicked ghost back");
    assert.ok(!(await bob.events(roomB)).some((e) => e.content?.body === "carol after the kick"));
    // A moderator lets it back in: carol is heard again.
    await bob.invite(roomB, ghost);
    await carol.sendText(roomA, "carol after the invite");
    await copyOf(bob, roomB, "carol after the invite");
});

test("calls: only a party of a call acts on it, and a copy's call_id cannot be computed from public data", async () => {
    const callA = `${Date.now()}boundary`;
    const sdp = "v=0\r\no=- 1 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";
    await alice.sendEvent(roomA, "m.call.invite", { call_id: callA, party_id: "ALICEPTY", version: "1", lifetime: 60000, offer: { type: "offer", sdp } });
    const inv = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.type === "m.call.invite" && e.content.party_id === "ALICEPTY", T, "alice's invite");
    const callB = inv.content.call_id;
    assert.ok(callB.startsWith(`${callA}-`), "the copy's call_id keeps the original as its prefix");
    // What anyone who saw the original could compute before (a hash of the original ID and the two rooms).
    const predictable = `${callA}-${crypto.createHash("sha256").update(`${callA}\0${roomA}\0${roomB}`).digest("hex").slice(0, 12)}`;
    assert.notEqual(callB, predictable, "the copy's call_id is not a function of public data");
    // carol, a member of room A but no party of the call, hangs it up.
    await carol.waitForEvent(roomA, (e) => e.type === "m.call.invite" && e.content.call_id === callA, T, "the invite at carol");
    await carol.sendEvent(roomA, "m.call.hangup", { call_id: callA, party_id: "CAROLPTY", version: "1", reason: "user_hangup" });
    // alice's candidates after it still cross: the call was not ended, and carol's hangup did not reach bob.
    await alice.sendEvent(roomA, "m.call.candidates", { call_id: callA, party_id: "ALICEPTY", version: "1", candidates: [{ candidate: "", sdpMid: "0", sdpMLineIndex: 0 }] });
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.type === "m.call.candidates" && e.content.call_id === callB, T, "alice's candidates");
    assert.ok(!(await bob.events(roomB)).some((e) => e.type === "m.call.hangup" && e.content.call_id === callB), "no hangup reached bob");
    await alice.sendEvent(roomA, "m.call.hangup", { call_id: callA, party_id: "ALICEPTY", version: "1", reason: "user_hangup" });
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.type === "m.call.hangup" && e.content.call_id === callB, T, "alice's own hangup");
});
