// Proves the harness itself: the homeserver + two matrix-js-sdk Rust-crypto clients exchange an encrypted message
// and see each other's cross-signed devices. No ferry involved.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { HS_LABEL, startHomeserver } from "../lib/homeserver.js";
import { createUser } from "../lib/users.js";

let hs;
let alice;
let bob;

before(async () => {
    hs = await startHomeserver({ sharedSecret: "harness-secret" });
    [alice, bob] = await Promise.all([createUser(hs.url, "alice"), createUser(hs.url, "bob")]);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await hs?.stop();
});

test(`encrypted message and cross-signing between two js-sdk clients on ${HS_LABEL}`, async () => {
    assert.match(alice.userId, /^@alice-[0-9a-f]{8}:ferry\.test$/);

    const roomId = await alice.createEncryptedRoom({ name: "harness", invite: [bob.userId] });
    await bob.join(roomId);
    // alice must have seen bob's join before sending, or bob gets no room key.
    await alice.waitForMembership(roomId, bob.userId, "join");

    const sentId = await alice.sendText(roomId, "hello bob", { "im.ferry.test": 1 });
    const got = await bob.waitForText(roomId, "hello bob");
    assert.equal(got.eventId, sentId);
    assert.equal(got.sender, alice.userId);
    assert.equal(got.encrypted, true);
    assert.equal(got.isDecryptionFailure, false);
    assert.equal(got.content["im.ferry.test"], 1);
    // Not cross-signed yet: an unverified sender gets a grey/red shield or none, but decryption worked.
    assert.ok(await bob.encryptionInfo(got));

    await Promise.all([alice.bootstrapCrossSigning(), bob.bootstrapCrossSigning()]);
    await bob.waitForDeviceSignedByOwner(alice.userId, alice.deviceId);
    const status = await bob.deviceStatus(alice.userId, alice.deviceId);
    assert.equal(status.signedByOwner, true);
});
