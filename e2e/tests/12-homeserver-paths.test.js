// How ferry's devices get their keys on each homeserver, proven by what crosses the wire: a proxy records every
// request ferry makes to the homeserver, another every transaction the homeserver pushes to ferry.
// - Synapse 1.163 with appservice-mode encryption: no login, no room /sync, no password, no admin account; devices are
//   created through the appservice (MSC4190) and their identities published without user-interactive auth;
//   to-device messages, device-list changes and one-time key counts arrive in transactions.
// - Dendrite 0.13.8, which has none of that: ferry logs its devices in and runs a /sync.
// - The fallback ferry promises when encryption.appservice is on but the homeserver does not offer it: one
//   warning line, then login + /sync, and relayed messages still arrive cross-signed (on both servers).
// - A Synapse that creates appservice devices but pushes nothing (its experimental features off): ferry stops at
//   start with one line naming the settings.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, test } from "node:test";
import { createTestDatabase, prepareFerry, startFerry } from "../lib/ferry.js";
import { HS_LABEL, onSynapse, skipUnless, startHomeserver } from "../lib/homeserver.js";
import { startSyncHoldProxy } from "../lib/proxy.js";
import { command, linkedPair, SHARED_SECRET, startStack } from "../lib/stack.js";
import { loginUser } from "../lib/users.js";
import { freePort, pollUntil, sleep, withTimeout } from "../lib/util.js";

const T = 30000;
const isGhost = (u) => u.startsWith("@_ferry_");
const cleanups = [];
after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {});
});

/** alice and bob, cross-signed and excluding insecure devices, in linked encrypted rooms of `stack`. */
async function linkedUsers(stack) {
    const pair = await linkedPair(stack, { names: ["paths A", "paths B"], crossSign: true, excludeInsecure: true });
    cleanups.push(pair.stop);
    return pair;
}

/** Relays one message each way and checks each copy decrypts with no shield. */
async function relayBothWays({ alice, bob, roomA, roomB }, tag) {
    await alice.sendText(roomA, `${tag} from A`);
    const inB = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === `${tag} from A`, T, "the copy in B");
    await bob.sendText(roomB, `${tag} from B`);
    const inA = await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.content.body === `${tag} from B`, T, "the copy in A");
    for (const [viewer, copy] of [[bob, inB], [alice, inA]]) {
        assert.equal(copy.isDecryptionFailure, false);
        const info = await viewer.encryptionInfo(copy);
        assert.deepEqual({ colour: info.colour, reason: info.reason }, { colour: "NONE", reason: null }, `${copy.eventId} carries a shield`);
    }
}

const called = (requests, method, re) => requests.filter((r) => r.method === method && re.test(r.path));

test(`${HS_LABEL}: ferry's devices get their keys the way this homeserver allows`, async () => {
    const stack = await startStack({ syncProxy: true, pushProxy: true });
    cleanups.push(() => stack.stop());
    const users = await linkedUsers(stack);
    await relayBothWays(users, "paths");
    const { alice, bob } = users;
    const requests = stack.proxy.requests;
    const ghosts = new Set(requests.filter((r) => r.userId && isGhost(r.userId)).map((r) => r.userId));
    assert.ok(ghosts.size >= 2, `ferry acted as both ghosts: ${[...ghosts]}`);
    const identityUploads = called(requests, "POST", /\/keys\/device_signing\/upload$/);

    if (onSynapse) {
        // bob adds a device: Synapse pushes the device-list change to ferry.
        const bob2 = await loginUser(stack.hs.url, bob.userId, bob.password);
        cleanups.push(() => bob2.stop());
        await pollUntil(() => stack.pushes.transactions.some((t) => t.deviceLists?.changed?.includes(bob.userId)), {
            timeoutMs: T,
            what: "a transaction carrying bob's device-list change",
        });
        assert.deepEqual(called(requests, "POST", /\/login$/), [], "ferry logged nothing in");
        // Two kinds of /sync, both the bot's: catch-ups of the bot device's to-device messages that Synapse held
        // back instead of pushing (the appservice's token as that device; rooms, presence and account data
        // filtered out), and the bot user's rooms-only /sync, which names no device (it would take the device's
        // to-device messages) and does not set the bot online.
        const syncs = called(requests, "GET", /\/sync$/);
        for (const r of syncs) {
            assert.ok(!r.userId || r.userId === stack.botUserId, `a /sync as ${r.userId}`);
            if (r.deviceId) {
                const filter = JSON.parse(r.filter ?? "{}");
                assert.deepEqual(filter.room?.rooms, [], `a device's /sync that reads rooms: ${r.filter}`);
            } else {
                assert.equal(r.presence, "offline", "the rooms-only /sync sets the bot online");
            }
        }
        assert.ok(syncs.some((r) => !r.deviceId), "the bot reads its rooms with a /sync of its own");
        assert.deepEqual(requests.filter((r) => /^\/_(synapse|dendrite)\/admin\//.test(r.path)), [], "ferry used no admin API (no admin account, no password)");
        const created = called(requests, "PUT", /\/_matrix\/client\/v3\/devices\/[^/]+$/).filter((r) => r.status === 200 || r.status === 201);
        assert.ok(created.some((r) => !r.userId || r.userId === stack.botUserId), "the bot's device was created through the appservice");
        for (const g of ghosts) assert.ok(created.some((r) => r.userId === g), `${g}'s device was created through the appservice`);
        assert.ok(identityUploads.length >= 3, `the bot and both ghosts published identities (${identityUploads.length} uploads)`);
        for (const u of identityUploads) {
            assert.equal(u.uia, false, `${u.userId ?? "the bot"} answered user-interactive auth to publish its identity`);
            assert.equal(u.status, 200);
        }
        const secrets = stack.sql("SELECT DISTINCT name FROM crypto_secrets").map((r) => r[0]);
        assert.ok(!secrets.includes("im.ferry.account_password"), "no password is stored");
        assert.ok(!secrets.includes("im.ferry.access_token"), "no access token is stored");
        // What Synapse pushed: the members' room keys for ferry's bot device, device lists, key counts.
        // A transaction that arrives while ferry's encryption is still starting is refused on purpose (500: the
        // homeserver sends it again, so no room key is lost); every transaction must end accepted. A transaction
        // still in flight has no answer yet (status 0).
        const txns = stack.pushes.transactions;
        const refused = () => [...new Map(txns.map((t) => [t.txnId, t.status]))].filter(([, status]) => status !== 200);
        await pollUntil(() => refused().length === 0, {
            timeoutMs: T,
            what: "ferry's acceptance of every transaction (Synapse sends a refused one again)",
        });
        assert.ok(
            txns.some((t) => t.toDevice.some((e) => e.type === "m.room.encrypted" && e.toUserId === stack.botUserId && e.sender === alice.userId)),
            "alice's room key reached the bot's device in a transaction",
        );
        assert.ok(txns.some((t) => t.otkCounts?.[stack.botUserId]), "the bot's one-time key count arrived in a transaction");
        const probe = stack.ferry.logLines().find((l) => l.message === "The homeserver pushes to-device messages, device lists and one-time key counts to ferry");
        assert.ok(probe, "ferry proved the pushes at start");
        const status = await command(stack, alice, users.roomA, "!ferry status");
        assert.match(status.content.body, /appservice mode/);
        // While each transaction follows the one before, nothing can be missing, and the rooms-only /sync idles:
        // messages cross without it (a waiting /sync is computed again for every event in the bot's rooms, the
        // originals and ferry's copies).
        await sleep(6000); // past the reading that the transactions after ferry's start began
        const roomSyncs = () => called(requests, "GET", /\/sync$/).filter((r) => !r.deviceId).length;
        const before = roomSyncs();
        for (let i = 0; i < 4; i++) await relayBothWays(users, `steady ${i}`);
        const during = roomSyncs() - before;
        assert.ok(during <= 2, `${during} rooms-only /sync requests while 8 messages crossed, their transactions in sequence`);
    } else {
        // Dendrite: each device logs in with m.login.application_service and the bot's runs a /sync.
        assert.ok(called(requests, "POST", /\/login$/).length >= 3, "the bot and both ghosts logged in");
        assert.ok(called(requests, "GET", /\/sync$/).some((r) => r.status === 200), "the bot's device runs a /sync");
        assert.ok(stack.pushes.transactions.every((t) => t.toDevice.length === 0), "Dendrite pushes no to-device messages");
        assert.ok(identityUploads.some((u) => u.uia && u.status === 200), "Dendrite asked for a password before accepting an identity");
        const status = await command(stack, alice, users.roomA, "!ferry status");
        assert.match(status.content.body, /login \+ \/sync/);
    }
});

test(`${HS_LABEL}: encryption.appservice on a homeserver that does not offer it falls back to login + /sync with one warning`, async () => {
    // On Synapse: its appservice-mode features off, and the installed registration written without
    // encryption.appservice (no io.element.msc4190), as when an admin turns the option on later. Dendrite 0.13.8
    // offers none of it anyway.
    const database = createTestDatabase();
    const hsPort = await freePort();
    const proxy = await startSyncHoldProxy(hsPort);
    const prepared = await prepareFerry({
        hsUrl: proxy.url,
        sharedSecret: SHARED_SECRET,
        db: { type: "postgres", uri: database.uri },
        extraConfig: { encryption: { appservice: false } },
    });
    const text = fs.readFileSync(prepared.configPath, "utf8");
    assert.match(text, /^ {2}appservice: false$/m);
    fs.writeFileSync(prepared.configPath, text.replace(/^ {2}appservice: false$/m, "  appservice: true"));
    const hs = await startHomeserver({
        appserviceRegistrations: [prepared.registrationPath],
        sharedSecret: SHARED_SECRET,
        port: hsPort,
        appserviceEncryption: false,
    });
    let ferry = null;
    cleanups.push(async () => {
        await ferry?.stop();
        await hs.stop();
        await proxy.close();
        database.drop();
        prepared.cleanup();
    });
    // On Synapse the start waits for the push probe to fail (three attempts of 10 s) before it falls back.
    ferry = await startFerry(prepared, { readyTimeoutMs: 90000 });
    const stack = { hs, proxy, botUserId: prepared.botUserId, get ferry() { return ferry; } };
    const users = await linkedUsers(stack);
    await relayBothWays(users, "fallback");
    const warnings = ferry.logLines().filter((l) => l.level === "warn" && /encryption\.appservice/.test(l.message ?? ""));
    assert.equal(warnings.length, 1, `one warning names encryption.appservice: ${JSON.stringify(warnings)}`);
    // Dendrite refuses to create devices for the appservice (no MSC4190); Synapse 1.163 creates them for any
    // appservice, but without its experimental features pushes nothing, which ferry's probe finds out.
    assert.match(warnings[0].message, onSynapse ? /does not push to-device messages/ : /does not offer MSC4190/);
    assert.match(warnings[0].message, /falling back to m\.login\.application_service/);
    assert.ok(called(proxy.requests, "POST", /\/login$/).length >= 3, "the bot and both ghosts logged in");
    assert.ok(called(proxy.requests, "GET", /\/sync$/).length >= 1, "the bot's device runs a /sync");
    const status = await command(stack, users.alice, users.roomA, "!ferry status");
    assert.match(status.content.body, /login \+ \/sync/);
    if (onSynapse) {
        // Synapse accepts a first cross-signing setup without a password: no admin account, no password set.
        assert.deepEqual(proxy.requests.filter((r) => /^\/_(synapse|dendrite)\/admin\//.test(r.path)), [], "no admin API used");
    }
});

test(`${HS_LABEL}: a Synapse that creates appservice devices but pushes nothing stops ferry with one line naming the settings`, async (t) => {
    if (skipUnless(t, "synapse", "Dendrite 0.13.8 has no appservice-mode encryption to turn on halfway (the fallback test covers it)")) return;
    const database = createTestDatabase();
    const prepared = await prepareFerry({ sharedSecret: SHARED_SECRET, db: { type: "postgres", uri: database.uri }, extraConfig: { encryption: { appservice: true } } });
    const hs = await startHomeserver({ appserviceRegistrations: [prepared.registrationPath], sharedSecret: SHARED_SECRET, port: prepared.hsPort, appserviceEncryption: false });
    let ferry = null;
    cleanups.push(async () => {
        await ferry?.stop();
        await hs.stop();
        database.drop();
        prepared.cleanup();
    });
    ferry = await startFerry(prepared, { waitReady: false });
    const exit = await withTimeout(ferry.exited, 90000, "ferry to exit");
    assert.ok(exit, "ferry stopped");
    assert.equal(exit.code, 4, "exit code 4: the homeserver cannot serve this configuration");
    const errors = ferry.logLines().filter((l) => l.level === "error");
    assert.equal(errors.length, 1, `one error line: ${JSON.stringify(errors)}`);
    assert.match(errors[0].error, /msc2409_to_device_messages_enabled/);
});
