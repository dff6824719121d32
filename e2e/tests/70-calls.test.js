// Issue 7's end-to-end proof: calls across linked encrypted rooms. matrix-js-sdk users alice (room A) and bob
// (room B) send the spec's call events as raw events; each side must receive the other's, decrypted, from the
// other's ghost, with the call_id its own room uses and every party_id unchanged. Then two werift WebRTC peers
// connect (ICE, DTLS, a data channel) using nothing but that relayed signaling. Group-call membership in one
// room rings the other without making anyone a member of a call there.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { RTCPeerConnection } from "werift";
import { createUser } from "../lib/users.js";
import { command, inviteBot, linkByRequest, startStack } from "../lib/stack.js";

let stack, alice, bob, roomA, roomB, bobGhostInA;
const T = 30000;

const isGhost = (userId) => userId.startsWith("@_ferry_");
let seq = 0;
/** A fresh call_id in the style js-sdk uses (timestamp first), with a readable tag. */
const newCallId = (tag) => `${Date.now()}${String(seq++).padStart(3, "0")}${tag}`;

/** Waits in roomId (as user) for a call event of type from a ghost whose content passes pred. */
function ghostCall(user, roomId, type, pred, what) {
    return user.waitForEvent(roomId, (e) => isGhost(e.sender) && e.type === type && pred(e.content), T, what ?? type);
}

/** The copy must be an encrypted event that the receiving client decrypted. */
function assertDecrypted(e) {
    assert.equal(e.encrypted, true, `${e.type} copy is encrypted`);
    assert.equal(e.isDecryptionFailure, false, `${e.type} copy decrypts`);
}

const sdpOffer = "v=0\r\no=- 20518 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n";
const sdpAnswer = sdpOffer.replace("20518", "99120");

function invite(callId, party, extra = {}) {
    return { call_id: callId, party_id: party, version: "1", lifetime: 60000, offer: { type: "offer", sdp: sdpOffer }, ...extra };
}

before(async () => {
    stack = await startStack({ permissions: { "*": "relay", "ferry.test": "user" } });
    [alice, bob] = await Promise.all(["alice", "bob"].map((n) => createUser(stack.hs.url, n, { displayName: n[0].toUpperCase() + n.slice(1) })));
    roomA = await alice.createEncryptedRoom({ name: "Room A" });
    roomB = await bob.createEncryptedRoom({ name: "Room B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    // Each user speaks once, so each one's ghost is in the other room (alice's invite names bob's ghost).
    await alice.sendText(roomA, "hi from A");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "hi from A", T, "alice's greeting");
    await bob.sendText(roomB, "hi from B");
    await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.content.body === "hi from B", T, "bob's greeting");
    bobGhostInA = alice.client.getRoom(roomA).getJoinedMembers().map((m) => m.userId).find((u) => isGhost(u) && u.includes("bob"));
    assert.ok(bobGhostInA, "bob's ghost is in room A");
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

test("a full 1:1 call crosses the link: every event decrypted, call IDs mapped per room, party IDs kept", async (t) => {
    const callA = newCallId("flow");
    const sentAt = Date.now();
    await alice.sendEvent(roomA, "m.call.invite", invite(callA, "ALICEPTY", { invitee: bobGhostInA, sdp_stream_metadata: { s1: { purpose: "m.usermedia" } } }));
    const inv = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "ALICEPTY", "alice's invite");
    assertDecrypted(inv);
    t.diagnostic(`invite relayed and decrypted ${Date.now() - sentAt} ms after alice sent it`);
    const callB = inv.content.call_id;
    assert.notEqual(callB, callA, "room B gets its own call_id");
    assert.equal(inv.content.offer.sdp, sdpOffer, "the SDP offer passes unchanged");
    assert.equal(inv.content.offer.type, "offer");
    assert.equal(inv.content.version, "1");
    assert.equal(inv.content.invitee, bob.userId, "the invitee (bob's ghost in A) becomes bob in B");
    assert.deepEqual(inv.content.sdp_stream_metadata, { s1: { purpose: "m.usermedia" } });
    assert.ok(inv.content.lifetime > 0 && inv.content.lifetime <= 60000, `lifetime ${inv.content.lifetime} is what is left of 60000`);
    assert.ok(inv.sender.includes("alice"), "sent by alice's ghost");
    // Element offers its 1:1 call button when the room has two members besides its functional members (the bot).
    const service = bob.client.getRoom(roomB).currentState.getStateEvents("io.element.functional_members", "")?.getContent().service_members ?? [];
    assert.deepEqual(service, [stack.botUserId]);
    const people = bob.client.getRoom(roomB).getJoinedMembers().map((m) => m.userId).filter((u) => !service.includes(u));
    assert.deepEqual(people.sort(), [bob.userId, inv.sender].sort(), "room B looks like a 1:1 room: bob and alice's ghost");

    // Candidates in two batches, in order.
    const c1 = [
        { candidate: "candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host", sdpMid: "0", sdpMLineIndex: 0 },
        { candidate: "candidate:2 1 udp 2130706431 127.0.0.1 40002 typ host", sdpMid: "0", sdpMLineIndex: 0 },
    ];
    const c2 = [{ candidate: "", sdpMid: "0", sdpMLineIndex: 0 }];
    await alice.sendEvent(roomA, "m.call.candidates", { call_id: callA, party_id: "ALICEPTY", version: "1", candidates: c1 });
    await alice.sendEvent(roomA, "m.call.candidates", { call_id: callA, party_id: "ALICEPTY", version: "1", candidates: c2 });
    const gotC2 = await ghostCall(bob, roomB, "m.call.candidates", (c) => c.call_id === callB && c.candidates[0]?.candidate === "", "alice's last candidates");
    const candsB = (await bob.events(roomB)).filter((e) => e.type === "m.call.candidates" && e.content.call_id === callB);
    assert.deepEqual(candsB.flatMap((e) => e.content.candidates), [...c1, ...c2], "candidates arrive complete and in order");
    candsB.forEach(assertDecrypted);
    assert.equal(gotC2.content.party_id, "ALICEPTY");

    // bob answers from two devices (two party IDs) in B's call_id; alice sees both answers under her own.
    await bob.sendEvent(roomB, "m.call.answer", { call_id: callB, party_id: "BOBDEV01", version: "1", answer: { type: "answer", sdp: sdpAnswer } });
    await bob.sendEvent(roomB, "m.call.answer", { call_id: callB, party_id: "BOBDEV02", version: "1", answer: { type: "answer", sdp: sdpAnswer } });
    const ans = await ghostCall(alice, roomA, "m.call.answer", (c) => c.party_id === "BOBDEV01", "bob's answer");
    assertDecrypted(ans);
    assert.equal(ans.content.call_id, callA, "the answer carries alice's own call_id");
    assert.equal(ans.content.answer.sdp, sdpAnswer);
    assert.ok(ans.sender.includes("bob"));
    const ans2 = await ghostCall(alice, roomA, "m.call.answer", (c) => c.party_id === "BOBDEV02", "bob's second device's answer");
    assert.equal(ans2.content.call_id, callA);

    await bob.sendEvent(roomB, "m.call.candidates", { call_id: callB, party_id: "BOBDEV01", version: "1", candidates: c1 });
    const bc = await ghostCall(alice, roomA, "m.call.candidates", (c) => c.party_id === "BOBDEV01", "bob's candidates");
    assertDecrypted(bc);
    assert.equal(bc.content.call_id, callA);
    assert.deepEqual(bc.content.candidates, c1);

    // alice picks the first device.
    await alice.sendEvent(roomA, "m.call.select_answer", { call_id: callA, party_id: "ALICEPTY", version: "1", selected_party_id: "BOBDEV01" });
    const sel = await ghostCall(bob, roomB, "m.call.select_answer", (c) => c.call_id === callB, "alice's select_answer");
    assertDecrypted(sel);
    assert.equal(sel.content.selected_party_id, "BOBDEV01");
    assert.equal(sel.content.party_id, "ALICEPTY");

    // Renegotiation and stream metadata both ways.
    await alice.sendEvent(roomA, "m.call.negotiate", { call_id: callA, party_id: "ALICEPTY", version: "1", lifetime: 10000, description: { type: "offer", sdp: sdpOffer } });
    const neg = await ghostCall(bob, roomB, "m.call.negotiate", (c) => c.call_id === callB, "alice's negotiate");
    assertDecrypted(neg);
    assert.equal(neg.content.description.sdp, sdpOffer);
    await bob.sendEvent(roomB, "m.call.sdp_stream_metadata_changed", { call_id: callB, party_id: "BOBDEV01", version: "1", sdp_stream_metadata: { s2: { purpose: "m.usermedia", audio_muted: true } } });
    const md = await ghostCall(alice, roomA, "m.call.sdp_stream_metadata_changed", (c) => c.call_id === callA, "bob's stream metadata");
    assertDecrypted(md);
    assert.deepEqual(md.content.sdp_stream_metadata, { s2: { purpose: "m.usermedia", audio_muted: true } });

    await bob.sendEvent(roomB, "m.call.hangup", { call_id: callB, party_id: "BOBDEV01", version: "1", reason: "user_hangup" });
    const hang = await ghostCall(alice, roomA, "m.call.hangup", (c) => c.call_id === callA, "bob's hangup");
    assertDecrypted(hang);
    assert.equal(hang.content.party_id, "BOBDEV01");
    assert.equal(hang.content.reason, "user_hangup");

    // Everything each side saw of this call, in order: all of it, with that side's call_id and the other's party IDs.
    const inA = (await alice.events(roomA)).filter((e) => e.type.startsWith("m.call.") && isGhost(e.sender) && e.content.call_id === callA);
    assert.deepEqual(
        inA.map((e) => [e.type, e.content.party_id]),
        [
            ["m.call.answer", "BOBDEV01"],
            ["m.call.answer", "BOBDEV02"],
            ["m.call.candidates", "BOBDEV01"],
            ["m.call.sdp_stream_metadata_changed", "BOBDEV01"],
            ["m.call.hangup", "BOBDEV01"],
        ],
    );
    const inB = (await bob.events(roomB)).filter((e) => e.type.startsWith("m.call.") && isGhost(e.sender) && e.content.call_id === callB);
    assert.deepEqual(
        inB.map((e) => [e.type, e.content.party_id]),
        [
            ["m.call.invite", "ALICEPTY"],
            ["m.call.candidates", "ALICEPTY"],
            ["m.call.candidates", "ALICEPTY"],
            ["m.call.select_answer", "ALICEPTY"],
            ["m.call.negotiate", "ALICEPTY"],
        ],
    );
    [...inA, ...inB].forEach(assertDecrypted);
});

test("an invite whose lifetime ran out is not relayed, nor its candidates", async () => {
    const callA = newCallId("expired");
    await alice.sendEvent(roomA, "m.call.invite", invite(callA, "EXPIREDP", { lifetime: 1 }));
    await alice.sendEvent(roomA, "m.call.candidates", { call_id: callA, party_id: "EXPIREDP", version: "1", candidates: [{ candidate: "", sdpMid: "0", sdpMLineIndex: 0 }] });
    // Room A is relayed in order: once this text arrived, ferry has dealt with the invite.
    await alice.sendText(roomA, "after the expired invite");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "after the expired invite", T, "the text after the invite");
    const leaked = (await bob.events(roomB)).filter((e) => e.type.startsWith("m.call.") && e.content.party_id === "EXPIREDP");
    assert.deepEqual(leaked, [], "nothing of the expired call reached room B");
});

test("a rejected call: the reject crosses back with the caller's call_id", async () => {
    const callA = newCallId("reject");
    await alice.sendEvent(roomA, "m.call.invite", invite(callA, "REJECTAP"));
    const inv = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "REJECTAP", "the invite to reject");
    await bob.sendEvent(roomB, "m.call.reject", { call_id: inv.content.call_id, party_id: "REJECTBP", version: "1" });
    const rej = await ghostCall(alice, roomA, "m.call.reject", (c) => c.party_id === "REJECTBP", "bob's reject");
    assertDecrypted(rej);
    assert.equal(rej.content.call_id, callA);
});

test("glare: alice and bob call each other at once, exactly one call survives on both sides", async () => {
    const stamp = Date.now();
    const callA = `${stamp}1glare`; // the lesser call_id: alice's call must win
    const callB = `${stamp}2glare`;
    await Promise.all([alice.sendEvent(roomA, "m.call.invite", invite(callA, "GLAREAAA")), bob.sendEvent(roomB, "m.call.invite", invite(callB, "GLAREBBB"))]);

    // In B: alice's call arrives, and bob's own call is hung up by alice's ghost.
    const winner = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "GLAREAAA", "alice's winning invite");
    const copyA = winner.content.call_id;
    assert.ok(copyA < callB, "a client applying the spec's rule in B also keeps alice's call");
    await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === callB, "the hangup of bob's losing call");

    // In A: bob's call either never arrived or, if it was relayed before alice's, it is hung up.
    const bobInvites = (await alice.events(roomA)).filter((e) => e.type === "m.call.invite" && e.content.party_id === "GLAREBBB");
    for (const e of bobInvites) await ghostCall(alice, roomA, "m.call.hangup", (c) => c.call_id === e.content.call_id, "the hangup of bob's invite copy");

    assert.match(stack.ferry.logs(), /Glare: /, "ferry settled the glare itself");

    // The surviving call works: bob answers it, alice gets the answer for her call_id.
    await bob.sendEvent(roomB, "m.call.answer", { call_id: copyA, party_id: "GLAREBBB", version: "1", answer: { type: "answer", sdp: sdpAnswer } });
    const ans = await ghostCall(alice, roomA, "m.call.answer", (c) => c.party_id === "GLAREBBB", "bob's answer to the surviving call");
    assert.equal(ans.content.call_id, callA);
    // Nobody hung up the survivor.
    assert.deepEqual((await alice.events(roomA)).filter((e) => e.type === "m.call.hangup" && e.content.call_id === callA), []);
    assert.deepEqual((await bob.events(roomB)).filter((e) => e.type === "m.call.hangup" && e.content.call_id === copyA), []);
    // Bob's losing call's later events go nowhere.
    await bob.sendEvent(roomB, "m.call.candidates", { call_id: callB, party_id: "GLAREBBB", version: "1", candidates: [{ candidate: "", sdpMid: "0", sdpMLineIndex: 0 }] });
    await alice.sendEvent(roomA, "m.call.hangup", { call_id: callA, party_id: "GLAREAAA", version: "1" });
    await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === copyA, "alice's hangup of the survivor");
    await bob.sendText(roomB, "after glare");
    await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.content.body === "after glare", T, "the text after glare");
    const stray = (await alice.events(roomA)).filter((e) => e.type === "m.call.candidates" && e.content.party_id === "GLAREBBB");
    assert.deepEqual(stray, [], "the losing call's candidates were not relayed");
});

test("glare after the losing invite was already relayed: its copy and the original are both hung up", async () => {
    const stamp = Date.now();
    const callA = `${stamp}1late`; // lesser: wins although it comes second
    const callB = `${stamp}2late`;
    await bob.sendEvent(roomB, "m.call.invite", invite(callB, "LATEBBBB"));
    const bobsCopy = await ghostCall(alice, roomA, "m.call.invite", (c) => c.party_id === "LATEBBBB", "bob's invite in A");
    // alice's invite crossed bob's in flight.
    await alice.sendEvent(roomA, "m.call.invite", invite(callA, "LATEAAAA"));
    const h1 = await ghostCall(alice, roomA, "m.call.hangup", (c) => c.call_id === bobsCopy.content.call_id, "the hangup of bob's copy in A");
    assertDecrypted(h1);
    assert.equal(h1.content.party_id, "LATEBBBB", "alice hears it from bob's party");
    const h2 = await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === callB, "the hangup of bob's own call in B");
    assert.equal(h2.content.party_id, "LATEAAAA", "bob hears it from alice's party");
    const survivor = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "LATEAAAA", "alice's invite in B");
    assert.ok(survivor.content.call_id < callB, "bob's client would also keep alice's call");
    await alice.sendEvent(roomA, "m.call.hangup", { call_id: callA, party_id: "LATEAAAA", version: "1" });
    await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === survivor.content.call_id, "alice's hangup");
});

/** A werift peer that gathers loopback host candidates only (the test machine has no other reachable route). */
function newPeer() {
    const pc = new RTCPeerConnection({ iceServers: [], iceUseIpv6: false, iceAdditionalHostAddresses: ["127.0.0.1"] });
    const candidates = [];
    const gathered = new Promise((resolve) => {
        pc.onicecandidate = ({ candidate }) => {
            if (!candidate) return resolve();
            if (/ 127\.0\.0\.1 /.test(candidate.candidate)) candidates.push({ candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex });
        };
    });
    return { pc, candidates, gathered };
}

/** Drops candidate lines from an SDP, so candidates travel only in m.call.candidates. */
const withoutCandidates = (sdp) =>
    sdp
        .split("\r\n")
        .filter((l) => !/^a=(candidate|end-of-candidates)/.test(l))
        .join("\r\n");

test("a real WebRTC connection (ICE, DTLS, data channel) is set up using only the relayed signaling", async (t) => {
    const callA = newCallId("webrtc");
    const a = newPeer();
    const b = newPeer();
    try {
        const dc = a.pc.createDataChannel("ferry");
        const aGot = new Promise((resolve) => (dc.onmessage = (m) => resolve(m.data.toString())));
        const dcOpen = new Promise((resolve) => (dc.onopen = resolve));
        const bGot = new Promise((resolve) => {
            b.pc.ondatachannel = ({ channel }) => {
                channel.onmessage = (m) => {
                    resolve(m.data.toString());
                    channel.send("pong from bob");
                };
            };
        });

        // alice: offer in the invite, her candidates in one batch after it.
        await a.pc.setLocalDescription(await a.pc.createOffer());
        await a.gathered;
        assert.ok(a.candidates.length > 0, "alice gathered a loopback candidate");
        const invitedAt = Date.now();
        await alice.sendEvent(roomA, "m.call.invite", invite(callA, "RTCALICE", { offer: { type: "offer", sdp: withoutCandidates(a.pc.localDescription.sdp) } }));
        await alice.sendEvent(roomA, "m.call.candidates", { call_id: callA, party_id: "RTCALICE", version: "1", candidates: [...a.candidates, { candidate: "", sdpMid: "0", sdpMLineIndex: 0 }] });

        // bob: only what arrives in room B.
        const inv = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "RTCALICE", "the WebRTC invite");
        const callB = inv.content.call_id;
        await b.pc.setRemoteDescription(inv.content.offer);
        const aCands = await ghostCall(bob, roomB, "m.call.candidates", (c) => c.call_id === callB, "alice's WebRTC candidates");
        await b.pc.setLocalDescription(await b.pc.createAnswer());
        await b.gathered;
        await bob.sendEvent(roomB, "m.call.answer", { call_id: callB, party_id: "RTCBOB01", version: "1", answer: { type: "answer", sdp: withoutCandidates(b.pc.localDescription.sdp) } });
        await bob.sendEvent(roomB, "m.call.candidates", { call_id: callB, party_id: "RTCBOB01", version: "1", candidates: b.candidates });
        for (const c of aCands.content.candidates) if (c.candidate) await b.pc.addIceCandidate(c);

        // alice: bob's answer and candidates, as relayed into room A.
        const ans = await ghostCall(alice, roomA, "m.call.answer", (c) => c.call_id === callA, "the WebRTC answer");
        await a.pc.setRemoteDescription(ans.content.answer);
        const bCands = await ghostCall(alice, roomA, "m.call.candidates", (c) => c.call_id === callA && c.party_id === "RTCBOB01", "bob's WebRTC candidates");
        for (const c of bCands.content.candidates) if (c.candidate) await a.pc.addIceCandidate(c);
        await alice.sendEvent(roomA, "m.call.select_answer", { call_id: callA, party_id: "RTCALICE", version: "1", selected_party_id: "RTCBOB01" });

        const within = (p, what) => Promise.race([p, new Promise((_, rej) => setTimeout(() => rej(new Error(`timed out waiting for ${what}`)), T).unref())]);
        await within(dcOpen, "the data channel to open (ICE + DTLS + SCTP)");
        t.diagnostic(`data channel open ${Date.now() - invitedAt} ms after alice sent the invite`);
        assert.equal(a.pc.connectionState, "connected");
        dc.send("ping from alice");
        assert.equal(await within(bGot, "bob's data channel message"), "ping from alice");
        assert.equal(await within(aGot, "alice's data channel message"), "pong from bob");
        assert.equal(b.pc.connectionState, "connected");

        await alice.sendEvent(roomA, "m.call.hangup", { call_id: callA, party_id: "RTCALICE", version: "1" });
        await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === callB, "the WebRTC call's hangup");
    } finally {
        await Promise.allSettled([a.pc.close(), b.pc.close()]);
    }
});

test("a group call starting in room A rings room B and names who is in it, without faking membership in B", async () => {
    const stateKey = `_${alice.userId}_${alice.deviceId}_m.call`;
    await alice.sendState(
        roomA,
        "org.matrix.msc3401.call.member",
        {
            application: "m.call",
            call_id: "",
            scope: "m.room",
            device_id: alice.deviceId,
            focus_active: { type: "livekit", focus_selection: "oldest_membership" },
            foci_preferred: [{ type: "livekit", livekit_service_url: "https://livekit.invalid", livekit_alias: roomA }],
            "m.call.intent": "video",
        },
        stateKey,
    );
    const ring = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.type === "m.rtc.notification", T, "the call notification");
    assertDecrypted(ring);
    assert.ok(ring.sender.includes("alice"), "the notification comes from alice's ghost");
    assert.equal(ring.content["m.call.intent"], "video");
    const notice = await bob.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /joined a call/.test(e.content.body ?? ""), T, "the call notice");
    assert.match(notice.content.body, /Room A/);
    assert.match(notice.content.body, new RegExp(alice.userId.replace(/[.]/g, "\\.")));
    const membersInB = bob.client.getRoom(roomB).currentState.getStateEvents("org.matrix.msc3401.call.member");
    assert.deepEqual(membersInB, [], "nobody became a member of a call in room B");

    // alice leaving the call does not ring again.
    await alice.sendState(roomA, "org.matrix.msc3401.call.member", {}, stateKey);
    await alice.sendText(roomA, "after leaving the call");
    await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === "after leaving the call", T, "the text after the call");
    const rings = (await bob.events(roomB)).filter((e) => e.type === "m.rtc.notification");
    assert.equal(rings.length, 1, "one notification for one call");
});

test("a client's own ringing event crosses once, standing alone, from the caller's ghost", async () => {
    // Fresh rooms: ringing into a room is sent at most once a minute, and room B was just rung.
    const a2 = await alice.createEncryptedRoom({ name: "Room A2" });
    const b2 = await bob.createEncryptedRoom({ name: "Room B2" });
    await inviteBot(stack, alice, a2);
    await inviteBot(stack, bob, b2);
    await linkByRequest(stack, alice, a2, bob, b2);

    // A state event stands in for the caller's call member event: state never crosses, so it has no copy in B2.
    const memberEvent = await alice.sendState(a2, "m.room.topic", { topic: "calling" });
    await alice.sendEvent(a2, "m.rtc.notification", {
        "m.mentions": { user_ids: [], room: true },
        notification_type: "ring",
        "m.relates_to": { rel_type: "m.reference", event_id: memberEvent },
        sender_ts: Date.now(),
        lifetime: 30000,
        "m.call.intent": "audio",
    });
    const ring = await bob.waitForEvent(b2, (e) => isGhost(e.sender) && e.type === "m.rtc.notification", T, "the relayed ring");
    assertDecrypted(ring);
    assert.equal(ring.content.notification_type, "ring");
    assert.equal(ring.content["m.call.intent"], "audio");
    assert.equal(ring.content["m.relates_to"], undefined, "the reference to a room-A event does not cross");
    // A second ring moments later is not relayed.
    await alice.sendEvent(a2, "m.rtc.notification", { "m.mentions": { user_ids: [], room: true }, notification_type: "ring", sender_ts: Date.now(), lifetime: 30000 });
    await alice.sendText(a2, "after the rings");
    await bob.waitForEvent(b2, (e) => isGhost(e.sender) && e.content.body === "after the rings", T, "the text after the rings");
    assert.equal((await bob.events(b2)).filter((e) => e.type === "m.rtc.notification").length, 1, "one ring per call");
});

test("unlinking mid-call hangs up the call on both sides", async () => {
    const callA = newCallId("unlink");
    await alice.sendEvent(roomA, "m.call.invite", invite(callA, "UNLINKAP"));
    const inv = await ghostCall(bob, roomB, "m.call.invite", (c) => c.party_id === "UNLINKAP", "the invite before unlinking");
    const callB = inv.content.call_id;
    await bob.sendEvent(roomB, "m.call.answer", { call_id: callB, party_id: "UNLINKBP", version: "1", answer: { type: "answer", sdp: sdpAnswer } });
    await ghostCall(alice, roomA, "m.call.answer", (c) => c.call_id === callA, "the answer before unlinking");

    assert.match((await command(stack, bob, roomB, "!ferry unlink")).content.body, /Unlinked/);
    const hA = await ghostCall(alice, roomA, "m.call.hangup", (c) => c.call_id === callA, "the hangup in A");
    assertDecrypted(hA);
    assert.ok(hA.sender.includes("bob"), "alice hears it from bob's ghost");
    assert.equal(hA.content.party_id, "UNLINKBP");
    const hB = await ghostCall(bob, roomB, "m.call.hangup", (c) => c.call_id === callB, "the hangup in B");
    assertDecrypted(hB);
    assert.ok(hB.sender.includes("alice"), "bob hears it from alice's ghost");
    assert.equal(hB.content.party_id, "UNLINKAP");
});

test("no SDP or ICE candidate reaches ferry's logs", () => {
    const logs = stack.ferry.logs();
    for (const secret of ["o=- 20518", "o=- 99120", "127.0.0.1 40001", "webrtc-datachannel", "a=fingerprint"]) {
        assert.ok(!logs.includes(secret), `ferry's log contains ${JSON.stringify(secret)}`);
    }
});
