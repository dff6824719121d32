// Issue 13's proof: exactly once and in order while everything around ferry fails. Two members of two linked
// encrypted rooms write to each other while fault-injecting proxies stand in both directions between ferry and
// the homeserver (rate limits of both kinds, server and gateway errors, resets before and after the homeserver
// acted, answers lost after it acted with its transaction IDs forgotten, slow answers), ferry is SIGKILLed every
// few seconds, PostgreSQL restarts once and the homeserver restarts once. Then each room's server-side history
// (/messages, decrypted by its member's client) must hold every message of the other room exactly once, in the
// order it was sent, decryptable; and ferry must be running.
//
// `make test` runs it with 1,000 messages on each homeserver; `make chaos` runs it alone with 10,000.
// FERRY_CHAOS_MESSAGES (default 1000, split between the two members), FERRY_CHAOS_SEED (default 13) and
// FERRY_CHAOS_RATE (share of ferry's requests that meet a fault, default 0.09) set the run; `make chaos` runs
// 10,000 messages.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { decrypter, serverHistory } from "../lib/history.js";
import { HS_LABEL } from "../lib/homeserver.js";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { pollUntil, repoRoot, sleep } from "../lib/util.js";

const MESSAGES = Number(process.env.FERRY_CHAOS_MESSAGES || 1000);
const SEED = Number(process.env.FERRY_CHAOS_SEED || 13);
const RATE = Number(process.env.FERRY_CHAOS_RATE || 0.09);
const BODY = /^chaos ([ab]) (\d+)$/;

/**
 * The details of each direction's count, and for an original that arrived late and the one sent right after it,
 * what ferry knew and did about them: their inbox rows and ferry's log lines naming them, so that a slip in a run
 * whose files are gone can be read. Run once, when the counts are printed: ferry's log is read a single time.
 */
function detailsOf(results) {
    const out = [];
    const lines = results.some((r) => r.late.length) ? stack.ferry.logLines().map((l) => [l, JSON.stringify(l)]) : [];
    for (const r of results) {
        for (const d of r.details) out.push(`${r.label}: ${d}`);
        for (const { origin, before, window } of r.late) {
            // From the first late original to the later one its copy came after: where each stands in ferry's
            // inbox (place in the room's queue, whether /sync showed it, when it arrived) and where its copy went.
            for (const id of window.slice(0, 60)) {
                const row = stack.sql(`SELECT seq, coalesce(ord, seq*1000), synced, received_at FROM inbox WHERE event_id='${id}'`)[0];
                out.push(`${r.label}:   #${r.position.get(id)} copy #${r.copyIndex.get(id) ?? "-"} ${id}: ${row ? `seq ${row[0]}, place ${row[1]}, synced ${row[2]}, received ${row[3]}` : "not in the inbox"}`);
            }
            for (const id of [origin, before].filter(Boolean)) {
                const row = stack.sql(`SELECT seq, state, attempts, synced, received_at, coalesce(session_id, '') FROM inbox WHERE event_id='${id}'`)[0];
                out.push(`${r.label}:   ${id === origin ? "late" : "next"} ${id}: ${row ? `inbox seq ${row[0]}, ${row[1]}, ${row[2]} attempts, synced ${row[3]}, received ${row[4]}, session ${row[5]}` : "not in the inbox"}`);
                for (const l of ferryLogAbout(lines, id).slice(0, 12)) out.push(`${r.label}:     ${l}`);
            }
        }
    }
    return out;
}

/** ferry's log lines (all runs; [parsed, JSON] pairs) that name an event, in short: time, level, message, fields. */
function ferryLogAbout(lines, eventId) {
    return lines
        .filter(([, text]) => text.includes(eventId))
        .map(([l]) => {
            const extra = Object.entries(l)
                .filter(([k]) => !["time", "level", "message", "event_id", "room_id", "component"].includes(k))
                .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
                .join(" ");
            return `${l.time ?? ""} ${l.level ?? ""} ${l.message ?? ""} ${extra}`.slice(0, 300);
        });
}

/** A small seeded generator (mulberry32): the kill schedule follows the seed like the proxies' faults. */
function generator(seed) {
    let a = seed >>> 0;
    return () => {
        a = (a + 0x6d2b79f5) >>> 0;
        let t = a;
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
}

let stack, alice, bob, roomA, roomB;

before(async () => {
    stack = await startStack({
        // Off while the rooms are set up; switched on for the run.
        faults: {
            toHomeserver: {
                seed: SEED, rate: RATE, off: true, forgetTxn: true, retryAfterMs: 500, slowMaxMs: 1500, holdMs: 2000,
                faults: "429=2,429h=1,500=1,502=2,503=1,504=1,reset=2,reset-after=2,lost=1,504-after=2,slow=2",
            },
            toFerry: { seed: SEED + 1, rate: RATE / 2, off: true, slowMaxMs: 1000, faults: "500=1,502=1,503=1,reset=1,reset-after=2,slow=1" },
        },
    });
    [alice, bob] = await Promise.all([createUser(stack.hs.url, "alice"), createUser(stack.hs.url, "bob")]);
    roomA = await alice.createEncryptedRoom({ name: "Chaos A" });
    roomB = await bob.createEncryptedRoom({ name: "Chaos B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkWithPower(stack, alice, roomA, bob, roomB);
    // One message each way, so both ghosts exist, have joined and have their devices before the faults start.
    await alice.sendText(roomA, "warm-up a");
    await bob.sendText(roomB, "warm-up b");
    await bob.waitForText(roomB, "warm-up a", 60000);
    await alice.waitForText(roomA, "warm-up b", 60000);
});

after(async () => {
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
});

/**
 * Counts one direction: the originals `sender` wrote in `src` (read by sender) against the copies in `dst`
 * (read by `reader`), matched by the copies' origin marker.
 */
async function countDirection(label, sender, src, reader, dst, decrypt) {
    const [srcHistory, dstHistory] = await Promise.all([serverHistory(sender, src), serverHistory(reader, dst)]);
    const originals = [];
    for (const raw of srcHistory) {
        if (raw.sender !== sender.userId) continue;
        const c = await decrypt.src(raw);
        if (c && BODY.test(c.content.body ?? "")) originals.push(raw.event_id);
    }
    const position = new Map(originals.map((id, i) => [id, i]));
    const copies = new Map(); // original event ID -> number of copies
    let undecryptable = 0;
    let stray = 0; // copies of something that is not one of the originals
    let outOfOrder = 0;
    let highest = -1;
    const details = []; // the first doubled and out-of-order copies, for the log
    const late = []; // originals whose copy came after a later one's, with the original sent right after
    const copyIndex = new Map(); // original event ID -> its first copy's place among the copies
    for (const raw of dstHistory) {
        if (!raw.sender.startsWith("@_ferry_")) continue;
        const c = await decrypt.dst(raw);
        if (!c) {
            undecryptable++;
            continue;
        }
        if (!BODY.test(c.content.body ?? "")) continue;
        const origin = c.content["im.ferry.origin"]?.event_id;
        if (!position.has(origin)) {
            stray++;
            continue;
        }
        const n = (copies.get(origin) ?? 0) + 1;
        copies.set(origin, n);
        if (n > 1) {
            if (details.length < 10) details.push(`${c.content.body} again as ${raw.event_id}`);
            continue;
        }
        copyIndex.set(origin, copyIndex.size);
        if (position.get(origin) < highest) {
            outOfOrder++;
            if (details.length < 10) details.push(`${c.content.body} (${raw.event_id}) after #${highest}`);
            if (late.length < 3) late.push({ origin, before: originals[position.get(origin) + 1], window: late.length ? [] : originals.slice(position.get(origin), highest + 1) });
        }
        highest = Math.max(highest, position.get(origin));
    }
    let lost = 0;
    let doubled = 0;
    for (const id of originals) {
        const n = copies.get(id) ?? 0;
        if (n === 0) lost++;
        doubled += Math.max(0, n - 1);
    }
    const missing = originals.filter((id) => !copies.has(id)).slice(0, 10);
    if (missing.length) details.push(`no copy of ${missing.join(" ")}`);
    // Where ferry stands with each: its inbox row (state, attempts, last error, session).
    for (const id of missing) {
        const row = stack.sql(`SELECT state, attempts, coalesce(last_error, ''), coalesce(session_id, '') FROM inbox WHERE event_id='${id}'`)[0];
        details.push(`  ${id}: ${row ? `inbox ${row[0]}, ${row[1]} attempts, session ${row[3]}${row[2] ? `, last error: ${row[2]}` : ""}` : "never received by ferry"}`);
    }
    return { label, originals: originals.length, copies: [...copies.values()].reduce((a, n) => a + n, 0), lost, doubled, outOfOrder, undecryptable, stray, details, late, position, copyIndex };
}

const line = (r) =>
    `${r.label}: ${r.originals} sent, ${r.copies} copies: ${r.lost} lost, ${r.doubled} doubled, ${r.outOfOrder} out of order, ${r.undecryptable} undecryptable` +
    (r.stray ? `, ${r.stray} copies of unknown originals` : "");

test(`chaos on ${HS_LABEL}: ${MESSAGES} messages, faults both ways, SIGKILLs, a PostgreSQL and a homeserver restart: each arrives once, in order`, async () => {
    const random = generator(SEED);
    const started = Date.now();
    const perSender = Math.ceil(MESSAGES / 2);
    const { toHomeserver, toFerry } = stack.faultProxies;
    await Promise.all([toHomeserver.on(), toFerry.on()]);

    // The senders pause while the homeserver restarts: their own clients are not under test (a client whose send
    // is cut off by the restart posts it again, and the homeserver, having forgotten the transaction, posts the
    // same ciphertext twice; ferry rightly refuses the second as a replay).
    let resume = null;
    let paused = null;
    let inFlight = 0;
    const send = async (user, roomId, body) => {
        for (let attempt = 1; ; attempt++) {
            while (paused) await paused;
            inFlight++;
            try {
                return await user.sendText(roomId, body);
            } catch (e) {
                // Sent or not, the history decides what counts as sent (see countDirection).
                if (attempt >= 5) throw new Error(`${user.userId} could not send ${body}: ${e.message}`);
                await sleep(1000);
            } finally {
                inFlight--;
            }
        }
    };
    // ferry is killed every 2–5 s while the members write, and started again at once.
    let kills = 0;
    let killing = true;
    const killer = (async () => {
        while (killing) {
            await sleep(2000 + random() * 3000);
            if (!killing) break;
            assert.equal(stack.ferry.exitInfo, null, `ferry exited on its own: ${JSON.stringify(stack.ferry.exitInfo)}`);
            await stack.stopFerry({ kill: true });
            kills++;
            await stack.startFerryAgain({ readyTimeoutMs: 180000 });
        }
    })();

    // PostgreSQL restarts (down for 2 s) at 40 % of the messages, the homeserver at 60 %.
    const restarts = (async () => {
        const progress = async (share) => pollUntil(() => sentSoFar() >= share * MESSAGES, { timeoutMs: 30 * 60000, intervalMs: 200, what: `${share * 100} % sent` });
        await progress(0.4);
        if (process.env.FERRY_TEST_PG_DATA) {
            execFileSync(path.join(repoRoot, "scripts", "with-postgres.sh"), ["--restart", "2"], { stdio: "inherit" });
            console.log("# PostgreSQL restarted (down for 2 s)");
        } else {
            console.log("# PostgreSQL not restarted: FERRY_TEST_PG names a server this test did not start");
        }
        await progress(0.6);
        paused = new Promise((r) => (resume = r));
        await pollUntil(() => inFlight === 0, { timeoutMs: 60000, what: "the members' sends in flight to finish" });
        await stack.hs.restart();
        paused = null;
        resume();
        console.log("# homeserver restarted");
    })();
    let sentA = 0;
    let sentB = 0;
    const sentSoFar = () => sentA + sentB;
    const counted = (user, roomId, side) => async () => {
        for (let i = 0; i < perSender; i++) {
            await send(user, roomId, `chaos ${side} ${String(i).padStart(5, "0")}`);
            if (side === "a") sentA++;
            else sentB++;
            await sleep(20);
        }
    };
    await Promise.all([counted(alice, roomA, "a")(), counted(bob, roomB, "b")(), restarts]);
    const sendSeconds = (Date.now() - started) / 1000;
    killing = false;
    await killer;

    // Faults stay on while ferry catches up; then the histories are counted until nothing is missing.
    const decrypt = {
        ab: { src: decrypter(alice), dst: decrypter(bob) },
        ba: { src: decrypter(bob), dst: decrypter(alice) },
    };
    let results;
    const count = async () => {
        results = await Promise.all([
            countDirection("a→b", alice, roomA, bob, roomB, decrypt.ab),
            countDirection("b→a", bob, roomB, alice, roomA, decrypt.ba),
        ]);
        return results.every((r) => r.lost === 0 && r.undecryptable === 0);
    };
    // Reading and decrypting both histories is heavy, and a homeserver busy serving it relays slower: the
    // histories are counted once ferry has nothing left to do (a cheap look at its inbox), then until they agree.
    // Under these faults each room's worker relays about 2–4 messages a second (every fault costs its send a
    // retry, and a room's sends go one after another, in order): 500 messages a direction take minutes to cross.
    const wait = Number(process.env.FERRY_CHAOS_WAIT_MS || 8 * 60000);
    const waitUntil = Date.now() + wait;
    const ferryBusy = () => Number(stack.sql(`SELECT count(*) FROM inbox WHERE state IN ('pending', 'waiting_keys')`)[0][0]) > 0;
    await pollUntil(() => !ferryBusy(), { timeoutMs: wait, intervalMs: 2000, what: "ferry to finish its inbox" }).catch(() => {});
    await pollUntil(count, { timeoutMs: Math.max(waitUntil - Date.now(), 30000), intervalMs: 10000, what: "every message to arrive" }).catch((e) => {
        for (const r of results ?? []) console.log(`# ${line(r)}`);
        for (const d of detailsOf(results ?? [])) console.log(`#   ${d}`);
        throw e;
    });
    await sleep(5000); // a late duplicate would show up by now
    await count();
    const tallies = await Promise.all([toHomeserver.tallies(), toFerry.tallies()]);
    const totalSeconds = (Date.now() - started) / 1000;
    console.log(`# chaos on ${HS_LABEL}: ${MESSAGES} messages sent in ${sendSeconds.toFixed(0)} s, all counted after ${totalSeconds.toFixed(0)} s; ferry SIGKILLed ${kills} times`);
    for (const r of results) console.log(`# ${line(r)}`);
    for (const d of detailsOf(results)) console.log(`#   ${d}`);
    for (const t of tallies) console.log(`# ${t.line}`);

    assert.equal(stack.ferry.exitInfo, null, "ferry is running at the end");
    for (const r of results) {
        assert.equal(r.originals, perSender, `${r.label}: every message was sent`);
        assert.equal(r.lost, 0, `${r.label}: lost`);
        assert.equal(r.doubled, 0, `${r.label}: doubled`);
        assert.equal(r.outOfOrder, 0, `${r.label}: out of order`);
        assert.equal(r.undecryptable, 0, `${r.label}: undecryptable`);
        assert.equal(r.stray, 0, `${r.label}: copies of unknown originals`);
    }
    assert.ok(tallies[0].injected > 0 && tallies[1].injected > 0, "faults were injected both ways");
    assert.ok(kills > 0, "ferry was killed");
});
