// Issue 14: `ferry doctor -c config.yaml` on a healthy set-up and on the set-ups that usually go wrong. Each
// finding is one line starting ok, warn, FAIL or skip; the exit status is 0 unless a line says FAIL.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { createTestDatabase, ferryBin, prepareFerry, startFerry } from "../lib/ferry.js";
import { HS_LABEL, ferryConfigFor, onSynapse, startHomeserver } from "../lib/homeserver.js";
import { startSyncHoldProxy } from "../lib/proxy.js";
import { SHARED_SECRET, command, inviteBot } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { freePort, sleep } from "../lib/util.js";

const T = 30000;
let database, prepared, hs, ferry;
let linked; // { alice, roomA }: a member and a linked room, from the first test
const cleanups = [];

before(async () => {
    database = createTestDatabase();
    prepared = await prepareFerry({ sharedSecret: SHARED_SECRET, db: { type: "postgres", uri: database.uri }, extraConfig: ferryConfigFor() });
    hs = await startHomeserver({ appserviceRegistrations: [prepared.registrationPath], sharedSecret: SHARED_SECRET, port: prepared.hsPort });
    // ferry starts once, as after an install, and stops: the doctor then stands in for it on its port.
    ferry = await startFerry(prepared, { readyTimeoutMs: 60000 });
    await settlePushes();
    await ferry.stop();
});

after(async () => {
    await ferry?.stop().catch(() => {});
    for (const c of cleanups.reverse()) await c();
    await hs?.stop();
    database?.drop();
    prepared?.cleanup();
});

/**
 * Waits until Synapse has pushed ferry what there is to push: its log names every transaction it had an answer to,
 * and none came for 2 s. Room events it pushes after ferry stopped are held for ferry, and every later push behind
 * them, the doctor's probes included (the doctor refuses room events, so that ferry gets them).
 */
async function settlePushes() {
    if (!onSynapse) return;
    const answered = new RegExp(`Received response to PUT http://[^/]+:${prepared.port}/_matrix/app/v1/transactions/`, "g");
    let seen = -1;
    let quietSince = Date.now();
    for (const deadline = Date.now() + 30000; Date.now() < deadline; await sleep(200)) {
        const n = (hs.logs().match(answered) ?? []).length;
        if (n !== seen) {
            seen = n;
            quietSince = Date.now();
        } else if (Date.now() - quietSince >= 2000) {
            return;
        }
    }
}

/**
 * Runs `ferry doctor`; returns { status, lines, byCheck(check) → the line of that check }. Without blocking: a
 * test's own servers (a proxy) must answer it.
 */
async function doctor(configPath = prepared.configPath, registrationPath = prepared.registrationPath) {
    const r = await new Promise((resolve) => {
        execFile(ferryBin(), ["doctor", "-c", configPath, "-r", registrationPath], { encoding: "utf8", timeout: 90000 }, (error, stdout) =>
            resolve({ stdout, status: error ? error.code : 0, error }),
        );
    });
    assert.equal(typeof r.status, "number", `ferry doctor ran: ${r.error}`);
    const lines = r.stdout.split("\n").filter(Boolean);
    for (const line of lines.slice(0, -1)) assert.match(line, /^(ok|warn|FAIL|skip) {2}[^:]+: /, `a finding per line: ${line}`);
    const byCheck = (check) => lines.find((l) => l.slice(6).startsWith(`${check}:`)) ?? "";
    return { status: r.status, lines, byCheck, text: r.stdout };
}

/** A copy of the config with `edits` ([from, to] pairs, each of which must occur) applied; returns its path. */
function variant(name, ...edits) {
    let text = fs.readFileSync(prepared.configPath, "utf8");
    for (const [from, to] of edits) {
        assert.ok(from instanceof RegExp ? from.test(text) : text.includes(from), `${from} in the config`);
        text = text.replace(from, to);
    }
    const file = path.join(prepared.dir, `config-${name}.yaml`);
    fs.writeFileSync(file, text, { mode: 0o600 });
    return file;
}

test(`${HS_LABEL}: a healthy set-up passes, with ferry stopped and with ferry running`, async () => {
    const stopped = await doctor();
    assert.equal(stopped.status, 0, stopped.text);
    for (const check of ["config", "pickle key", "database", "homeserver", "clock", "registration file", "registration and as_token"]) {
        assert.match(stopped.byCheck(check), /^ok/, `${check}: ${stopped.text}`);
    }
    assert.match(stopped.byCheck("database"), /ferry v\d+, crypto store v\d+, state store v\d+/, "the schema versions are named");
    if (onSynapse) {
        assert.match(stopped.byCheck("homeserver reaches ferry"), /^ok .*ferry doctor \(standing in for the stopped ferry\).*hs_token matches/);
        assert.match(stopped.byCheck("appservice-mode encryption"), /^ok .*MSC4190.*MSC2409.*MSC3202/);
        assert.ok(!stopped.lines.some((l) => /probe device .* could not be deleted/.test(l)), `the probe device is deleted again: ${stopped.text}`);
        assert.match(stopped.byCheck("bot's rooms /sync"), /^ok .*allowed/);
    } else {
        assert.match(stopped.byCheck("homeserver reaches ferry"), /^skip .*no appservice ping/);
        assert.match(stopped.byCheck("appservice-mode encryption"), /^ok .*off/);
        assert.match(stopped.byCheck("bot's rooms /sync"), /^ok .*not needed/);
    }
    assert.match(stopped.byCheck("bot's power"), /^ok .*no linked rooms yet/);

    // Running, with two linked rooms, in one of which the bot lost its power.
    ferry = await startFerry(prepared, { readyTimeoutMs: 60000 });
    const alice = await createUser(hs.url, "alice");
    cleanups.push(() => alice.stop());
    const stack = { hs, prepared, botUserId: prepared.botUserId, ferry };
    const roomA = await alice.createEncryptedRoom({ name: "Doctor A" });
    const roomB = await alice.createEncryptedRoom({ name: "Doctor B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, alice, roomB);
    assert.match((await command(stack, alice, roomA, `!ferry link ${roomB}`, T)).content.body, /^Linked/);
    linked = { alice, roomA };
    await alice.client.setPowerLevel(roomB, prepared.botUserId, 0);
    const running = await doctor();
    assert.equal(running.status, 0, `warnings do not fail: ${running.text}`);
    if (onSynapse) assert.match(running.byCheck("homeserver reaches ferry"), /^ok .*pinged ferry .*hs_token matches/);
    const power = running.lines.filter((l) => l.slice(6).startsWith("bot's power:"));
    assert.equal(power.length, 2, running.text);
    assert.ok(power.some((l) => l.startsWith("ok") && l.includes(roomA)), `enough power in room A: ${running.text}`);
    assert.ok(power.some((l) => l.startsWith("warn") && l.includes(roomB) && /fix: give .* moderator power/.test(l)), `too little in room B: ${running.text}`);
    await settlePushes();
    await ferry.stop();
});

test(`${HS_LABEL}: broken set-ups fail on the check that names the problem, with its fix`, async () => {
    // A registration the homeserver never loaded.
    const stranger = await prepareFerry({ hsUrl: prepared.hsUrl, db: { type: "postgres", uri: database.uri } });
    cleanups.push(() => stranger.cleanup());
    const noReg = await doctor(stranger.configPath, stranger.registrationPath);
    assert.equal(noReg.status, 1, noReg.text);
    assert.match(noReg.byCheck("registration and as_token"), /^FAIL .*M_UNKNOWN_TOKEN.*-- fix: list the file ferry -g wrote/);

    // Tokens that differ from the installed registration's.
    const asToken = await doctor(variant("as-token", [prepared.asToken, "wrong-as-token"]));
    assert.equal(asToken.status, 1, asToken.text);
    assert.match(asToken.byCheck("registration and as_token"), /^FAIL .*M_UNKNOWN_TOKEN/);
    assert.match(asToken.byCheck("registration file"), /^FAIL .*as_token differs/);
    const hsToken = await doctor(variant("hs-token", [prepared.hsToken, "wrong-hs-token"]));
    assert.equal(hsToken.status, 1, hsToken.text);
    assert.match(hsToken.byCheck("registration file"), /^FAIL .*hs_token differs/);
    if (onSynapse) assert.match(hsToken.byCheck("homeserver reaches ferry"), /^FAIL .*different hs_token/);

    // ferry listens on another port than the registration's url leads to.
    const otherPort = await freePort();
    const unreachable = await doctor(variant("unreachable", [new RegExp(`^ {2}port: ${prepared.port}$`, "m"), `  port: ${otherPort}`]));
    if (onSynapse) {
        assert.equal(unreachable.status, 1, unreachable.text);
        assert.match(unreachable.byCheck("homeserver reaches ferry"), /^FAIL .*could not reach ferry.*nothing arrived at .*-- fix: set appservice.address/);
    } else {
        // Dendrite 0.13.8 has no appservice ping: nothing asks it to reach ferry on demand, and the doctor says so.
        assert.match(unreachable.byCheck("homeserver reaches ferry"), /^skip .*no appservice ping/);
    }

    // The database is down.
    const deadDb = await freePort();
    const dbDown = await doctor(variant("db-down", [database.uri, `postgres://postgres@127.0.0.1:${deadDb}/ferry?sslmode=disable`]));
    assert.equal(dbDown.status, 1, dbDown.text);
    assert.match(dbDown.byCheck("database"), /^FAIL .*cannot reach the postgres database.*-- fix: check database.uri/);
    assert.match(dbDown.byCheck("bot's power"), /^skip .*database/);
    assert.match(dbDown.byCheck("homeserver"), /^ok/, "the other checks still run");
});

test(`${HS_LABEL}: a homeserver that refuses the bot's /sync without a device fails that check where ferry needs it`, async () => {
    // ferry's bot reads its rooms with a /sync of its own, without a device, only with appservice-mode encryption
    // (Synapse): there the refusal is a failure with its fix; on Dendrite the bot's device reads them, and the
    // doctor does not ask.
    const proxy = await startSyncHoldProxy(hs.port);
    cleanups.push(() => proxy.close());
    proxy.refuse((r) => r.method === "GET" && r.path.endsWith("/sync") && !r.deviceId);
    const r = await doctor(variant("sync-refused", [prepared.hsUrl, proxy.url]));
    const line = r.byCheck("bot's rooms /sync");
    for (const check of ["homeserver", "registration and as_token", "appservice-mode encryption"]) {
        assert.match(r.byCheck(check), /^ok/, `${check} passes through the proxy: ${r.text}`);
    }
    if (onSynapse) {
        assert.equal(r.status, 1, r.text);
        assert.match(line, /^FAIL .*refuses the bot's \/sync without a device \(M_FORBIDDEN\).*-- fix: let the appservice \/sync as the users of its namespace/);
        assert.ok(proxy.requests.some((q) => q.path.endsWith("/sync") && !q.deviceId && q.status === 403), "the doctor asked, and was refused");
    } else {
        assert.equal(r.status, 0, r.text);
        assert.match(line, /^ok .*not needed/);
        assert.ok(!proxy.requests.some((q) => q.path.endsWith("/sync") && !q.deviceId), "the doctor did not ask Dendrite");
    }
});

test(`${HS_LABEL}: appservice-mode encryption the homeserver cannot do fails with the settings to change`, async () => {
    let configPath;
    if (onSynapse) {
        // A Synapse that creates appservice devices (MSC4190) but has the push extensions off.
        const port = await freePort();
        const off = await startHomeserver({ appserviceRegistrations: [prepared.registrationPath], sharedSecret: SHARED_SECRET, port, appserviceEncryption: false });
        cleanups.push(() => off.stop());
        configPath = variant("synapse-off", [prepared.hsUrl, off.url]);
    } else {
        // Dendrite offers no appservice mode at all; a registration written with it on changes nothing there.
        configPath = variant("dendrite-asmode", [/^ {2}appservice: false$/m, "  appservice: true"]);
    }
    const r = await doctor(configPath);
    assert.equal(r.status, 1, r.text);
    const line = r.byCheck("appservice-mode encryption");
    if (onSynapse) assert.match(line, /^FAIL .*pushed no to-device message.*-- fix: on Synapse set experimental_features\.msc2409_to_device_messages_enabled/);
    else assert.match(line, /^FAIL .*does not create devices for the appservice \(MSC4190\).*set encryption.appservice to false/);
});

test(`${HS_LABEL}: room events held for the stopped ferry make the probe wait, and the doctor says so instead of blaming the homeserver's settings`, async () => {
    assert.ok(linked, "the first test linked a room");
    // A message while ferry is stopped: the homeserver's push finds no one, and the homeserver holds it for ferry.
    const before = onSynapse ? (hs.logs().match(/Error sending request to +PUT http:\/\/[^ ]*\/transactions\//g) ?? []).length : 0;
    await linked.alice.sendText(linked.roomA, "while ferry is stopped");
    if (onSynapse) {
        for (const deadline = Date.now() + 30000; ; await sleep(200)) {
            if ((hs.logs().match(/Error sending request to +PUT http:\/\/[^ ]*\/transactions\//g) ?? []).length > before) break;
            assert.ok(Date.now() < deadline, "the homeserver tried to push the message to the stopped ferry");
        }
    }
    const held = await doctor();
    assert.equal(held.status, 0, `a check that could not be made fails nothing: ${held.text}`);
    const line = held.byCheck("appservice-mode encryption");
    if (onSynapse) assert.match(line, /^warn .*not checked: the homeserver holds room events for the stopped ferry.*-- fix: start ferry/);
    else assert.match(line, /^ok .*off/);

    // As the line says: ferry started takes them, and then the probe goes through.
    ferry = await startFerry(prepared, { readyTimeoutMs: 60000 });
    await settlePushes();
    await ferry.stop();
    const after = await doctor();
    if (onSynapse) assert.match(after.byCheck("appservice-mode encryption"), /^ok .*MSC4190.*MSC2409.*MSC3202/, after.text);
});
