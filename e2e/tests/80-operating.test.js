// Issue 14, what an operator sees and does on a running ferry: the Prometheus metrics move as ferry relays, shares
// keys and redacts disappearing messages; SIGHUP reopens the log file (external log rotation) and reloads the
// permissions without stopping ferry.
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, test } from "node:test";
import { HS_LABEL } from "../lib/homeserver.js";
import { msum, parseMetrics } from "../lib/metrics.js";
import { freePort } from "../lib/util.js";
import { command, inviteBot, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";

const T = 30000;
const suffix = Math.random().toString(16).slice(2, 10);
const adminName = `admin-${suffix}`;
const relayName = `relayonly-${suffix}`;

let stack, admin, mallory, room, metricsUrl;

before(async () => {
    const metricsPort = await freePort();
    metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
    stack = await startStack({
        permissions: { "*": "relay", "ferry.test": "user", [`@${relayName}:ferry.test`]: "relay" },
        admins: [`@${adminName}:ferry.test`],
        extraConfig: { metrics: { enabled: true, listen: `127.0.0.1:${metricsPort}` } },
    });
    [admin, mallory] = await Promise.all([
        createUser(stack.hs.url, adminName, { randomSuffix: false, displayName: "Admin" }),
        createUser(stack.hs.url, relayName, { randomSuffix: false, displayName: "Mallory" }),
    ]);
    room = await admin.createEncryptedRoom({ name: "Operating" });
    await inviteBot(stack, admin, room);
    await admin.invite(room, mallory.userId);
    await mallory.join(room);
    await admin.waitForMembership(room, mallory.userId, "join");
});

after(async () => {
    await Promise.all([admin?.stop(), mallory?.stop()]);
    await stack?.stop();
});

/** Scrapes ferry's metrics: a list of { name, labels: { key: value }, value }. */
async function scrape() {
    const resp = await fetch(metricsUrl);
    assert.equal(resp.status, 200);
    assert.match(resp.headers.get("content-type"), /^text\/plain/);
    return parseMetrics(await resp.text());
}

test(`${HS_LABEL}: the metrics move as ferry relays, shares keys and redacts disappearing messages`, async () => {
    const roomB = await admin.createEncryptedRoom({ name: "Operating B" });
    await inviteBot(stack, admin, roomB);
    const before = await scrape();
    assert.equal(msum(before, "ferry_database_up"), 1, "the scrape reads the database");
    assert.equal(msum(before, "ferry_build_info"), 1, "build info is there");
    for (const reason of ["key_missing", "key_withheld", "untrusted_device", "decrypt_error"]) {
        assert.ok(before.some((m) => m.name === "ferry_undecryptable_events_total" && m.labels.reason === reason), `undecryptable ${reason} is a series from the start`);
    }

    const linked = await command(stack, admin, room, `!ferry link ${roomB}`, T);
    assert.match(linked.content.body, /^Linked/);
    await command(stack, admin, room, "!ferry disappear 5s", T);
    const sent = await admin.sendText(room, "counted and then gone");
    const copy = await admin.waitForEvent(roomB, (e) => e.content.body === "counted and then gone" && e.sender.startsWith("@_ferry_"), T, "the relayed copy");
    // The copy and the original disappear 5 s after the original was sent.
    await admin.waitForEvent(roomB, (e) => e.eventId === copy.eventId && e.redacted, T, "the copy redacted");
    await admin.waitForEvent(room, (e) => e.eventId === sent && e.redacted, T, "the original redacted");
    let after;
    for (let i = 0; i < 50; i++) {
        after = await scrape();
        if (msum(after, "ferry_disappear_redactions_total", { outcome: "done" }) - msum(before, "ferry_disappear_redactions_total", { outcome: "done" }) >= 2) break;
        await new Promise((r) => setTimeout(r, 100));
    }
    const moved = (name, labels) => msum(after, name, labels) - msum(before, name, labels);

    assert.ok(moved("ferry_relayed_events_total", { type: "m.room.message", outcome: "sent" }) >= 1, "a relayed message is counted as sent");
    assert.equal(moved("ferry_relayed_events_total", { outcome: "failed" }), 0, "nothing failed");
    assert.ok(moved("ferry_relay_latency_seconds_count") >= 1, "its latency is observed");
    assert.ok(moved("ferry_relay_latency_seconds_sum") > 0);
    assert.ok(moved("ferry_relay_processing_seconds_count") >= 1, "ferry's own part of it too");
    assert.ok(moved("ferry_relay_processing_seconds_sum") < moved("ferry_relay_latency_seconds_sum"), "which is less than all of it");
    assert.ok(moved("ferry_key_shares_total") >= 1, "the ghost shared a room key into room B");
    assert.ok(moved("ferry_key_share_devices_total", { result: "shared" }) >= 1, "to the admin's device");
    assert.ok(moved("ferry_olm_sessions_created_total") >= 1, "over a new Olm session");
    assert.ok(moved("ferry_database_commit_seconds_count", { operation: "intake" }) >= 1, "the intake commits are timed");
    assert.ok(moved("ferry_database_commit_seconds_count", { operation: "relay" }) >= 1, "the relay commits are timed");
    assert.ok(moved("ferry_homeserver_requests_total", { method: "PUT", endpoint: "/_matrix/client/v3/rooms/{roomId}/send/{id}/{id}", errcode: "none" }) >= 1,
        "the send is counted by endpoint");
    assert.ok(moved("ferry_disappear_redactions_total", { outcome: "done" }) >= 2, "the copy and the original were redacted");
    assert.ok(moved("ferry_disappear_redaction_lateness_seconds_count") >= 2, "their lateness is observed");
    assert.equal(moved("ferry_undecryptable_events_total"), 0, "every message decrypted");
    assert.equal(msum(after, "ferry_inbox_events", { state: "pending" }), 0, "nothing is left waiting");
    assert.equal(msum(after, "ferry_disappear_redactions_due"), 0, "no redaction is overdue");
    assert.ok(msum(after, "go_goroutines") > 0, "the Go runtime's metrics are there");
});

test(`${HS_LABEL}: in a private room only the first new ghost's join is refused; the ghosts after it are invited first`, async () => {
    // Element's rooms are private: a ghost may join only once invited. ferry learns that from the first refusal in a
    // room and invites the ghosts after it before they join, instead of a refused join for every new sender.
    const source = await admin.createEncryptedRoom({ name: "Operating C" });
    const target = await admin.createEncryptedRoom({ name: "Operating D" });
    await inviteBot(stack, admin, source);
    await inviteBot(stack, admin, target);
    await admin.invite(source, mallory.userId);
    await mallory.join(source);
    await admin.waitForMembership(source, mallory.userId, "join");
    const linked = await command(stack, admin, source, `!ferry link ${target}`, T);
    assert.match(linked.content.body, /^Linked/);

    const memberPut = { method: "PUT", endpoint: "/_matrix/client/v3/rooms/{roomId}/state/{id}/{userId}" };
    const before = await scrape();
    const ghosts = new Set();
    for (const [member, text] of [[admin, "first new sender"], [mallory, "second new sender"]]) {
        await member.sendText(source, text);
        const copy = await admin.waitForEvent(target, (e) => e.content.body === text && e.sender.startsWith("@_ferry_"), T, `the copy of "${text}"`);
        ghosts.add(copy.sender);
    }
    assert.equal(ghosts.size, 2, "each sender has a ghost of its own");
    for (const ghost of ghosts) await admin.waitForMembership(target, ghost, "join");
    const after = await scrape();
    const moved = (labels) => msum(after, "ferry_homeserver_requests_total", labels) - msum(before, "ferry_homeserver_requests_total", labels);
    assert.equal(moved({ ...memberPut, errcode: "M_FORBIDDEN" }), 1, "one refused join: the first ghost's");
    assert.equal(moved({ ...memberPut, errcode: "none" }), 4, "an invite and a join for each ghost");
});

test(`${HS_LABEL}: SIGHUP reopens the log file and reloads the permissions; ferry keeps running`, async () => {
    const refused = await command(stack, mallory, room, "!ferry ping", T);
    assert.match(refused.content.body, /yours is `relay`/);

    // The permission changes in the file (which ferry has upgraded to the current layout at start).
    const cfg = fs.readFileSync(stack.prepared.configPath, "utf8");
    const entry = `"@${relayName}:ferry.test": "relay"`;
    assert.ok(cfg.includes(entry), "the config lists mallory as relay");
    fs.writeFileSync(stack.prepared.configPath, cfg.replace(entry, `"@${relayName}:ferry.test": "user"`));
    // An external tool rotates the log: it moves the file away, then signals ferry.
    const logFile = stack.ferry.logFile;
    fs.renameSync(logFile, `${logFile}.1`);
    process.kill(stack.ferry.pid, "SIGHUP");

    const reloaded = await stack.ferry.waitForLog((l) => l.message === "Permissions reloaded", T, "the permissions reloaded");
    assert.ok(reloaded.entries >= 3, `entries: ${reloaded.entries}`);
    assert.ok(stack.ferry.logLines().some((l) => l.message === "Reopened the log files"), "the reopening is logged in the new file");
    const old = fs.readFileSync(`${logFile}.1`, "utf8");
    assert.match(old, /"Starting ferry"/, "the moved file keeps what was logged before");
    assert.doesNotMatch(old, /Permissions reloaded/, "nothing is written to the moved file after SIGHUP");
    assert.doesNotMatch(stack.ferry.logs(), /"Starting ferry"/, "the new file starts at the SIGHUP");

    const pong = await command(stack, mallory, room, "!ferry ping", T);
    assert.match(pong.content.body, /^Pong/, "mallory's new level took effect");
    assert.ok(!stack.ferry.exitInfo, `ferry is still running (${JSON.stringify(stack.ferry.exitInfo)})`);
});
