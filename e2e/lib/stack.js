// A whole ferry test stack: a fresh Postgres database, ferry's config and registration, the homeserver that
// FERRY_E2E_HS selects (Dendrite or Synapse, see homeserver.js) with that registration, ferry itself, and helpers
// that read ferry's database the way an admin would.
//
//   const stack = await startStack({ permissions: { "ferry.test": "user" } });
//   stack.botUserId, stack.hs.url, stack.ferry (restart with stack.restartFerry())
//   await stack.sql("SELECT count(*) FROM inbox")  -> rows as arrays of strings
//   startStack({ faults: { toHomeserver: { rate: 0.09 }, toFerry: { rate: 0.05 } } }) -> stack.faultProxies
import { execFileSync } from "node:child_process";
import { createTestDatabase, deepMerge, prepareFerry, startFerry } from "./ferry.js";
import { ferryConfigFor, startHomeserver } from "./homeserver.js";
import { startFaultProxy } from "./faultproxy.js";
import { startPushProxy, startSyncHoldProxy } from "./proxy.js";
import { createUser } from "./users.js";
import { freePort, sleep } from "./util.js";

export const SHARED_SECRET = "ferry-e2e-shared-secret";

export async function startStack({
    permissions = { "*": "relay", "ferry.test": "user" },
    admins = [],
    extraConfig = {},
    db = "postgres",
    syncProxy = false,
    pushProxy = false,
    homeserver = {},
    extraRegistrations = [],
    faults,
} = {}) {
    const database = db === "postgres" ? createTestDatabase() : null;
    // With syncProxy, ferry reaches the homeserver through a proxy that records its requests, can hold its /sync
    // and lose the answer to a send; with pushProxy, the homeserver reaches ferry through one that records the
    // transactions (see proxy.js).
    const hsPort = await freePort();
    const proxy = syncProxy ? await startSyncHoldProxy(hsPort) : null;
    const pushPort = pushProxy ? await freePort() : null;
    // With faults ({ toHomeserver, toFerry }: startFaultProxy options for each direction), ferry's requests to the
    // homeserver and the homeserver's transactions to ferry go through fault-injecting proxies (faultproxy.js).
    const ferryPort = await freePort();
    const toHomeserver = faults?.toHomeserver ? await startFaultProxy({ name: "ferry→homeserver", ...faults.toHomeserver, target: proxy ? proxy.url : `http://127.0.0.1:${hsPort}` }) : null;
    const toFerry = faults?.toFerry ? await startFaultProxy({ name: "homeserver→ferry", ...faults.toFerry, target: `http://127.0.0.1:${ferryPort}` }) : null;
    const config = deepMerge(ferryConfigFor(), extraConfig);
    if (pushPort) config.appservice = { ...config.appservice, address: `http://127.0.0.1:${pushPort}` };
    if (toFerry) config.appservice = { ...config.appservice, address: toFerry.url };
    const prepared = await prepareFerry({
        hsDomain: "ferry.test",
        hsUrl: toHomeserver ? toHomeserver.url : proxy ? proxy.url : `http://127.0.0.1:${hsPort}`,
        sharedSecret: SHARED_SECRET,
        db: database ? { type: "postgres", uri: database.uri } : undefined,
        permissions,
        admins,
        extraConfig: config,
        port: ferryPort,
    });
    const pushes = pushPort ? await startPushProxy(pushPort, prepared.port) : null;
    const hs = await startHomeserver({
        appserviceRegistrations: [prepared.registrationPath, ...extraRegistrations],
        sharedSecret: prepared.sharedSecret,
        serverName: prepared.hsDomain,
        port: hsPort,
        ...homeserver,
    });
    let ferry = await startFerry(prepared);
    const stack = {
        hs,
        proxy,
        pushes,
        /** The fault proxies ({ toHomeserver, toFerry }, each null unless asked for). */
        faultProxies: { toHomeserver, toFerry },
        prepared,
        database,
        botUserId: "@ferrybot:ferry.test",
        get ferry() {
            return ferry;
        },
        async restartFerry({ kill = false } = {}) {
            if (kill) await ferry.kill9();
            else await ferry.stop();
            ferry = await startFerry(prepared);
            return ferry;
        },
        async stopFerry({ kill = false } = {}) {
            if (kill) await ferry.kill9();
            else await ferry.stop();
        },
        /** Starts ferry again after stopFerry; opts go to startFerry (e.g. readyTimeoutMs). */
        async startFerryAgain(opts) {
            ferry = await startFerry(prepared, opts);
            return ferry;
        },
        /** Runs SQL against ferry's database; returns rows as arrays of strings. */
        sql(query) {
            if (!database) throw new Error("sql(): the stack uses SQLite");
            const out = execFileSync("psql", [database.uri, "-X", "-q", "-tA", "-F", "\t", "-c", query], { encoding: "utf8" });
            return out.split("\n").filter((l) => l !== "").map((l) => l.split("\t"));
        },
        /** pg_dump of ferry's whole database as text. */
        dump() {
            if (!database) throw new Error("dump(): the stack uses SQLite");
            return execFileSync("pg_dump", ["--no-owner", database.uri], { encoding: "utf8", maxBuffer: 256 << 20 });
        },
        async stop() {
            await ferry?.stop().catch(() => {});
            await hs?.stop();
            await proxy?.close();
            await pushes?.close();
            await toHomeserver?.stop();
            await toFerry?.stop();
            database?.drop();
            prepared.cleanup();
        },
    };
    return stack;
}

/** Invites the bot into a room, waits until it joined and gives it moderator power (50), all ferry needs. */
export async function inviteBot(stack, user, roomId, { power = 50 } = {}) {
    await user.invite(roomId, stack.botUserId);
    await user.waitForMembership(roomId, stack.botUserId, "join", 30000);
    if (power) await user.client.setPowerLevel(roomId, stack.botUserId, power);
}

/** Sends a command and waits for the bot's decrypted m.notice reply to it; returns the reply's plain event. */
export async function command(stack, user, roomId, text, timeoutMs = 30000) {
    const cmdId = await user.sendText(roomId, text);
    return user.waitForEvent(
        roomId,
        (e) => e.sender === stack.botUserId && e.type === "m.room.message" && e.content.msgtype === "m.notice" && e.content["m.relates_to"]?.["m.in_reply_to"]?.event_id === cmdId,
        timeoutMs,
        `the bot's reply to "${text}"`,
    );
}

/**
 * Links roomA (where `a` runs `!ferry link`) with roomB: when ferry answers with a link request (a lacks power in
 * roomB), `b` waits for the request in roomB and accepts it. Resolves once the rooms are linked.
 */
export async function linkByRequest(stack, a, roomA, b, roomB, timeoutMs = 30000) {
    const asked = await command(stack, a, roomA, `!ferry link ${roomB}`, timeoutMs);
    if (/Linked/.test(asked.content.body)) return;
    await b.waitForEvent(roomB, (e) => e.sender === stack.botUserId && /asks to link/.test(e.content.body ?? ""), timeoutMs, "the link request");
    const accepted = await command(stack, b, roomB, "!ferry accept", timeoutMs);
    if (!/Linked/.test(accepted.content.body)) throw new Error(`!ferry accept answered: ${accepted.content.body}`);
}

/**
 * Links roomA with roomB in one command: `owner` (roomA's creator) brings `linker` (who has power in roomB) into
 * roomA with moderator power, `linker` runs `!ferry link` in roomB, then leaves roomA again.
 */
export async function linkWithPower(stack, owner, roomA, linker, roomB, timeoutMs = 30000) {
    await owner.invite(roomA, linker.userId);
    await linker.join(roomA);
    await owner.client.setPowerLevel(roomA, linker.userId, 50);
    await sleep(500); // the power level reaches ferry's state store
    const linked = await command(stack, linker, roomB, `!ferry link ${roomA}`, timeoutMs);
    if (!/Linked/.test(linked.content.body)) throw new Error(`!ferry link answered: ${linked.content.body}`);
    await linker.leave(roomA);
}

/**
 * The usual start of a test file: alice and bob (fresh users; `users` gives createUser options for each, e.g.
 * { displayName }), each in an encrypted room of their own with the bot, the two rooms linked (by alice's request
 * that bob accepts, or with `link: "power"` by one command of bob, who is given power in alice's room). With
 * `crossSign` both users set up cross-signing, with `excludeInsecure` their clients exclude insecure devices.
 * Returns { alice, bob, roomA, roomB, stop() } (stop stops the two clients).
 */
export async function linkedPair(stack, { names = ["Linked A", "Linked B"], users = [{}, {}], link = "request", crossSign = false, excludeInsecure = false } = {}) {
    const [alice, bob] = await Promise.all([createUser(stack.hs.url, "alice", users[0]), createUser(stack.hs.url, "bob", users[1])]);
    const stop = () => Promise.all([alice.stop(), bob.stop()]);
    try {
        if (crossSign) await Promise.all([alice.bootstrapCrossSigning(), bob.bootstrapCrossSigning()]);
        if (excludeInsecure) await Promise.all([alice.setExcludeInsecureDevices(true), bob.setExcludeInsecureDevices(true)]);
        const roomA = await alice.createEncryptedRoom({ name: names[0] });
        const roomB = await bob.createEncryptedRoom({ name: names[1] });
        await inviteBot(stack, alice, roomA);
        await inviteBot(stack, bob, roomB);
        if (link === "power") await linkWithPower(stack, alice, roomA, bob, roomB);
        else await linkByRequest(stack, alice, roomA, bob, roomB);
        return { alice, bob, roomA, roomB, stop };
    } catch (e) {
        await stop();
        throw e;
    }
}
