// Issue 14: backup and restore as docs/OPERATING.md describes them (pg_dump of the database, a copy of the config
// holding the pickle key; pg_restore into a fresh database). After a restore of a backup taken before ferry went
// on relaying, ferry relays again from the same devices, and clients see nothing new: no undecryptable message,
// no changed shield, no reused Megolm message index.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { createTestDatabase } from "../lib/ferry.js";
import { HS_LABEL } from "../lib/homeserver.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";

const T = 30000;
let stack, alice, bob, roomA, roomB, restoredDb;

const isGhost = (userId) => userId.startsWith("@_ferry_");

before(async () => {
    stack = await startStack();
    [alice, bob] = await Promise.all(["alice", "bob"].map((n) => createUser(stack.hs.url, n)));
    roomA = await alice.createEncryptedRoom({ name: "Backup A" });
    roomB = await bob.createEncryptedRoom({ name: "Backup B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await command(stack, alice, roomA, `!ferry link ${roomB}`, T);
    await bob.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /asks to link/.test(e.content.body ?? ""), T, "the link request");
    assert.match((await command(stack, bob, roomB, "!ferry accept", T)).content.body, /Linked/);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
    restoredDb?.drop();
});

/** Sends body from alice in room A; returns bob's copy in room B with the sending device's identity. */
async function relay(body) {
    await alice.sendText(roomA, body);
    const copy = await bob.waitForEvent(roomB, (e) => isGhost(e.sender) && e.content.body === body, T, `the copy of "${body}"`);
    const wire = copy.event.getWireContent();
    const info = await bob.encryptionInfo(copy, roomB);
    return { copy, device: wire.device_id, senderKey: wire.sender_key, session: wire.session_id, shield: info?.colour };
}

test(`${HS_LABEL}: a restored backup relays again from the same devices, with nothing new for clients to warn about`, async () => {
    const first = await relay("before the backup");
    assert.equal(first.shield, "NONE", "the relayed message has no shield warning");

    // Backup, as the guide says: the database (pg_dump, custom format) and the config with its pickle key. Taken
    // with ferry stopped, the hardest case: nothing in it says ferry was running.
    const dir = stack.prepared.dir;
    await stack.stopFerry();
    const dump = path.join(dir, "ferry.dump");
    execFileSync("pg_dump", ["--format=custom", "--file", dump, stack.database.uri]);
    fs.copyFileSync(stack.prepared.configPath, path.join(dir, "config.yaml.backup"));
    await stack.startFerryAgain();

    // ferry goes on: the ghost's Megolm session moves past what the backup holds.
    for (const body of ["after the backup 1", "after the backup 2"]) await relay(body);

    // The database is lost. Restore into a fresh one, with the config of the backup (here only the database's
    // name differs, as test databases are named at random).
    await stack.stopFerry({ kill: true });
    restoredDb = createTestDatabase();
    execFileSync("pg_restore", ["--no-owner", "--dbname", restoredDb.uri, dump]);
    const config = fs.readFileSync(path.join(dir, "config.yaml.backup"), "utf8");
    assert.ok(config.includes(stack.database.uri));
    fs.writeFileSync(stack.prepared.configPath, config.replace(stack.database.uri, restoredDb.uri), { mode: 0o600 });
    const ferry = await stack.startFerryAgain();
    const restored = await ferry.waitForLog((l) => /restored from a backup/.test(l.message ?? ""), T, "the restore noticed");
    assert.equal(restored.level, "warn");

    const after = await relay("after the restore");
    assert.equal(after.device, first.device, "the ghost sends from the same device");
    assert.equal(after.senderKey, first.senderKey, "with the same identity key");
    assert.notEqual(after.session, first.session, "on a new Megolm session: the backup's was used further since");
    assert.equal(after.shield, "NONE", "no shield warning after the restore");
    const reply = "bob answers after the restore";
    await bob.sendText(roomB, reply);
    await alice.waitForEvent(roomA, (e) => isGhost(e.sender) && e.content.body === reply, T, "bob's answer relayed");
    for (const [user, room] of [[bob, roomB], [alice, roomA]]) {
        const failures = (await user.events(room)).filter((e) => e.isDecryptionFailure);
        assert.deepEqual(failures.map((e) => e.decryptionFailureReason), [], `${user.userId} can read every message`);
    }
});
