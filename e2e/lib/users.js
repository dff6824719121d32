// Real E2EE Matrix users for e2e tests: matrix-js-sdk 43 clients with Rust crypto (in-memory stores).
//
//   const alice = await createUser(hs.url, "alice");          // fresh @alice-<random>:ferry.test, synced
//   const roomId = await alice.createEncryptedRoom({ name: "r", invite: [bob.userId] });
//   const ev = await bob.waitForEvent(roomId, (e) => e.content.body === "hi");
//   await alice.stop();
//
// Events handed to predicates and returned by waitForEvent/events() are plain objects built from the *clear*
// event: { type, content, sender, eventId, roomId, stateKey, ts, encrypted, redacted, isDecryptionFailure,
// decryptionFailureReason, raw, event }. An event that could not be decrypted keeps type "m.room.encrypted" and its
// wire content (so predicates on message types never match it) and has isDecryptionFailure: true. `event` is the
// js-sdk MatrixEvent (for encryptionInfo()); `raw` is its effective (clear) JSON.
import crypto from "node:crypto";
import * as sdk from "matrix-js-sdk";
import {
    AllDevicesIsolationMode,
    CryptoEvent,
    EventShieldColour,
    EventShieldReason,
    OnlySignedDevicesIsolationMode,
} from "matrix-js-sdk/lib/crypto-api/index.js";
import { logger as sdkRootLogger } from "matrix-js-sdk/lib/logger.js";
import loglevel from "loglevel";
import { printNodeVersionOnce, withTimeout } from "./util.js";

const { ClientEvent, EventType, MatrixEventEvent, RoomEvent, RoomMemberEvent, RoomStateEvent } = sdk;

export { EventShieldColour, EventShieldReason };

const DEFAULT_TIMEOUT = 15000;

// ---- logging ----------------------------------------------------------------------------------------------------
// js-sdk sets every logger it creates to debug. We give each client our own logger (the Rust crypto layer logs
// through it too) and lower the deprecated global one. FERRY_E2E_SDK_LOG=debug|info|warn|error (default error).
const LEVELS = { trace: 0, debug: 1, info: 2, warn: 3, error: 4, silent: 5 };
const sdkLevel = LEVELS[process.env.FERRY_E2E_SDK_LOG ?? "error"] ?? LEVELS.error;
// Modules that log through js-sdk's module-level loggers (MatrixRTC, ...) get loglevel loggers forced to debug;
// filter in every loglevel method factory, including the defaults later loggers copy.
{
    const noop = () => {};
    const filtered = (factory) =>
        factory.ferryFiltered
            ? factory
            : Object.assign(
                  function (methodName, ...rest) {
                      return (LEVELS[methodName] ?? LEVELS.info) >= sdkLevel ? factory.call(this, methodName, ...rest) : noop;
                  },
                  { ferryFiltered: true },
              );
    loglevel.methodFactory = filtered(loglevel.methodFactory);
    for (const l of Object.values(loglevel.getLoggers())) l.methodFactory = filtered(l.methodFactory);
    loglevel.rebuild();
    sdkRootLogger.methodFactory = filtered(sdkRootLogger.methodFactory);
    sdkRootLogger.rebuild?.();
}

/** A js-sdk Logger for one client; silent once `muted()` (the client was stopped: only shutdown noise follows). */
function makeLogger(prefix, muted) {
    const out = (level, fn) =>
        LEVELS[level] >= sdkLevel ? (...args) => !muted() && fn(`[${prefix}]`, ...args) : () => {};
    return {
        trace: out("trace", console.debug),
        debug: out("debug", console.debug),
        info: out("info", console.info),
        warn: out("warn", console.warn),
        error: out("error", console.error),
        getChild: (ns) => makeLogger(`${prefix}${ns}`, muted),
    };
}

// ---- timers -----------------------------------------------------------------------------------------------------
// js-sdk arms a setTimeout per HTTP request (60-110 s, its AbortSignal.timeout ponyfill) and never clears it, and its
// capabilities poller may re-arm a 6 h timer after stopClient(). Those keep a finished test process alive for up to
// two minutes. Its Rust-crypto layer also keeps a 5-minute timer per live event that stays undecryptable
// (onLiveEventFromSync), which kept whole test files alive for 5 minutes. Unref exactly those timers: an in-flight
// request is kept alive by its socket anyway.
{
    const realSetTimeout = globalThis.setTimeout;
    const isSdkTimer = (fn, ms) =>
        typeof fn === "function" &&
        (ms >= 3600000 ||
            (ms >= 30000 && /^\(\) => \{\s*controller\.abort\(\);?\s*\}$/.test(fn.toString())) ||
            (ms === 5 * 60 * 1000 && /onDecrypted/.test(fn.toString())));
    if (!realSetTimeout.ferryWrapped) {
        globalThis.setTimeout = Object.assign(
            function setTimeout(fn, ms, ...args) {
                const t = realSetTimeout(fn, ms, ...args);
                if (isSdkTimer(fn, ms)) t?.unref?.();
                return t;
            },
            { ferryWrapped: true, [Symbol.for("nodejs.util.promisify.custom")]: realSetTimeout[Symbol.for("nodejs.util.promisify.custom")] },
        );
    }
}

// ---- raw HTTP ---------------------------------------------------------------------------------------------------
export class HttpError extends Error {
    constructor(method, url, status, body) {
        super(`${method} ${url} -> ${status}: ${JSON.stringify(body)}`);
        this.status = status;
        this.body = body;
    }
}

async function request(method, url, body, { token, okStatuses = [200] } = {}) {
    const res = await fetch(url, {
        method,
        headers: {
            "content-type": "application/json",
            ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(DEFAULT_TIMEOUT),
    });
    const text = await res.text();
    let json;
    try {
        json = text ? JSON.parse(text) : {};
    } catch {
        json = { raw: text };
    }
    if (!okStatuses.includes(res.status)) throw new HttpError(method, url, res.status, json);
    return { status: res.status, body: json };
}

const randomSuffix = () => crypto.randomBytes(4).toString("hex");

/**
 * Registers `localpart` through open registration (UIA m.login.dummy) without logging in.
 * Returns { userId }. Throws HttpError on failure.
 */
export async function registerUser(hsUrl, localpart, password) {
    const url = `${hsUrl}/_matrix/client/v3/register`;
    const body = { username: localpart, password, inhibit_login: true };
    // First round: the server answers 401 with a UIA session and its flows.
    const first = await request("POST", url, body, { okStatuses: [200, 401] });
    if (first.status === 200) return { userId: first.body.user_id };
    const flows = first.body.flows ?? [];
    if (!flows.some((f) => f.stages?.length === 1 && f.stages[0] === "m.login.dummy")) {
        throw new Error(`registerUser: ${hsUrl} offers no m.login.dummy flow: ${JSON.stringify(flows)}`);
    }
    const done = await request("POST", url, { ...body, auth: { type: "m.login.dummy", session: first.body.session } });
    return { userId: done.body.user_id };
}

/**
 * Registers through the shared-secret admin API (`/_synapse/admin/v1/register`, which Dendrite implements):
 * GET a nonce, then POST with mac = HMAC-SHA1(secret, nonce \0 user \0 password \0 admin|notadmin).
 * Works for localparts inside an exclusive appservice namespace too. Returns { userId, accessToken, deviceId }.
 */
export async function registerWithSharedSecret(hsUrl, secret, localpart, password, admin = false) {
    const url = `${hsUrl}/_synapse/admin/v1/register`;
    const { body: nonceBody } = await request("GET", url);
    const mac = crypto
        .createHmac("sha1", secret)
        .update([nonceBody.nonce, localpart, password, admin ? "admin" : "notadmin"].join("\0"))
        .digest("hex");
    const { body } = await request("POST", url, { nonce: nonceBody.nonce, username: localpart, password, admin, mac });
    return { userId: body.user_id, accessToken: body.access_token, deviceId: body.device_id };
}

/** Password login; returns { userId, accessToken, deviceId }. */
export async function passwordLogin(hsUrl, user, password, deviceDisplayName) {
    const { body } = await request("POST", `${hsUrl}/_matrix/client/v3/login`, {
        type: "m.login.password",
        identifier: { type: "m.id.user", user },
        password,
        initial_device_display_name: deviceDisplayName,
    });
    return { userId: body.user_id, accessToken: body.access_token, deviceId: body.device_id };
}

/**
 * Creates a fresh user `<localpart>-<random>` (open registration), logs in and returns a started E2EE client
 * wrapper (see loginUser). opts: { password, displayName, excludeInsecureDevices, randomSuffix: true }.
 */
export async function createUser(hsUrl, localpart, opts = {}) {
    const name = opts.randomSuffix === false ? localpart : `${localpart}-${randomSuffix()}`;
    const password = opts.password ?? `pw-${crypto.randomBytes(8).toString("hex")}`;
    await registerUser(hsUrl, name.toLowerCase(), password);
    return loginUser(hsUrl, name.toLowerCase(), password, opts);
}

/**
 * Logs in an existing user (a new device each time), starts a js-sdk client with in-memory Rust crypto and
 * waits for the first sync. opts: { displayName, excludeInsecureDevices, deviceDisplayName, cryptoCallbacks } (the
 * latter as matrix-js-sdk's createClient takes them, e.g. getSecretStorageKey for secret storage).
 */
export async function loginUser(hsUrl, user, password, opts = {}) {
    printNodeVersionOnce();
    const login = await passwordLogin(hsUrl, user, password, opts.deviceDisplayName ?? "ferry-e2e");
    const localpart = login.userId.slice(1).split(":")[0];
    // Once stopped, every request of this client (in flight or new) fails as aborted: js-sdk's crypto layer retries
    // connection errors for ~30 s, which would keep the test process alive after the homeserver is gone.
    const stopper = new AbortController();
    const fetchFn = (url, init = {}) => {
        if (stopper.signal.aborted) return Promise.reject(new DOMException("client stopped", "AbortError"));
        const signal = init.signal ? AbortSignal.any([init.signal, stopper.signal]) : stopper.signal;
        return fetch(url, { ...init, signal });
    };
    const client = sdk.createClient({
        baseUrl: hsUrl,
        userId: login.userId,
        deviceId: login.deviceId,
        accessToken: login.accessToken,
        fetchFn,
        logger: makeLogger(localpart, () => stopper.signal.aborted),
        cryptoCallbacks: opts.cryptoCallbacks,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const wrapper = new TestUser({ client, hsUrl, password, stopper, ...login });
    if (opts.excludeInsecureDevices) await wrapper.setExcludeInsecureDevices(true);
    await wrapper.start();
    if (opts.displayName) await client.setDisplayName(opts.displayName);
    return wrapper;
}

/** Plain-object view of a MatrixEvent (see the header comment). */
export function plainEvent(ev) {
    const failed = ev.isDecryptionFailure();
    return {
        type: failed ? ev.getWireType() : ev.getType(),
        content: failed ? ev.getWireContent() : ev.getOriginalContent(),
        sender: ev.getSender(),
        eventId: ev.getId(),
        roomId: ev.getRoomId(),
        stateKey: ev.getStateKey(),
        ts: ev.getTs(),
        encrypted: ev.isEncrypted(),
        redacted: ev.isRedacted(),
        isDecryptionFailure: failed,
        decryptionFailureReason: ev.decryptionFailureReason ?? null,
        raw: ev.getEffectiveEvent(),
        event: ev,
    };
}

const pending = (ev) => ev.isBeingDecrypted() || (ev.isEncrypted() && ev.shouldAttemptDecryption());

export class TestUser {
    constructor({ client, hsUrl, password, userId, accessToken, deviceId, stopper }) {
        this.client = client;
        this.stopper = stopper;
        this.hsUrl = hsUrl;
        this.password = password;
        this.userId = userId;
        this.accessToken = accessToken;
        this.deviceId = deviceId;
        this.stopped = false;
    }

    get crypto() {
        return this.client.getCrypto();
    }

    /** Starts syncing and waits for the first sync to complete. */
    async start(timeoutMs = DEFAULT_TIMEOUT) {
        const ready = new Promise((resolve, reject) => {
            const onSync = (state, _prev, data) => {
                if (state === "PREPARED" || state === "SYNCING") {
                    this.client.off(ClientEvent.Sync, onSync);
                    resolve();
                } else if (state === "ERROR") {
                    this.client.off(ClientEvent.Sync, onSync);
                    reject(new Error(`${this.userId}: first sync failed: ${data?.error?.message ?? "unknown"}`));
                }
            };
            this.client.on(ClientEvent.Sync, onSync);
        });
        await this.client.startClient({ initialSyncLimit: 50 });
        await withTimeout(ready, timeoutMs, `${this.userId}'s first sync`);
    }

    async stop() {
        if (this.stopped) return;
        this.stopped = true;
        this.stopper?.abort();
        this.client.stopClient();
    }

    /**
     * Resolves once `check()` returns a truthy value, re-checking whenever one of `emitters`' `events` fires.
     * Rejects after `timeoutMs` with a message naming `what`.
     */
    _waitUntil(check, listeners, timeoutMs, what) {
        let cleanup = () => {};
        const p = new Promise((resolve, reject) => {
            const attempt = async () => {
                try {
                    const v = await check();
                    if (v) resolve(v);
                } catch (e) {
                    reject(e);
                }
            };
            for (const [emitter, name] of listeners) emitter.on(name, attempt);
            cleanup = () => {
                for (const [emitter, name] of listeners) emitter.off(name, attempt);
            };
            void attempt();
        });
        return withTimeout(p, timeoutMs, `${this.userId}: ${what}`).finally(() => cleanup());
    }

    /** Waits until the client knows room `roomId` (and, if `encrypted`, that encryption is on). */
    async waitForRoom(roomId, { encrypted = false, timeoutMs = DEFAULT_TIMEOUT } = {}) {
        return this._waitUntil(
            async () => {
                const room = this.client.getRoom(roomId);
                if (!room) return null;
                if (encrypted && !(await this.crypto.isEncryptionEnabledInRoom(roomId))) return null;
                return room;
            },
            [
                [this.client, ClientEvent.Room],
                [this.client, RoomStateEvent.Events],
            ],
            timeoutMs,
            `room ${roomId}${encrypted ? " with encryption enabled" : ""} to appear`,
        );
    }

    /** Creates an unencrypted (default) or encrypted room; returns its ID once the client has it. */
    async createRoom({ name, invite = [], encrypted = false, preset = "private_chat", extra = {} } = {}) {
        const initial_state = [...(extra.initial_state ?? [])];
        if (encrypted) {
            initial_state.push({
                type: "m.room.encryption",
                state_key: "",
                content: { algorithm: "m.megolm.v1.aes-sha2" },
            });
        }
        const { room_id: roomId } = await this.client.createRoom({ preset, ...extra, name, invite, initial_state });
        await this.waitForRoom(roomId, { encrypted });
        return roomId;
    }

    createEncryptedRoom({ name, invite = [], ...rest } = {}) {
        return this.createRoom({ ...rest, name, invite, encrypted: true });
    }

    async invite(roomId, userId) {
        await this.client.invite(roomId, userId);
    }

    /** Joins (waiting for the invite first if `waitForInvite`), then waits until the room is in this client. */
    async join(roomId, { waitForInvite = true, timeoutMs = DEFAULT_TIMEOUT } = {}) {
        if (waitForInvite) await this.waitForMembership(roomId, this.userId, "invite", timeoutMs);
        await this.client.joinRoom(roomId);
        await this.waitForMembership(roomId, this.userId, "join", timeoutMs);
    }

    async leave(roomId) {
        await this.client.leave(roomId);
    }

    /** Waits until this client sees `userId`'s membership in `roomId` equal to `membership`. */
    async waitForMembership(roomId, userId, membership, timeoutMs = DEFAULT_TIMEOUT) {
        return this._waitUntil(
            () => this.client.getRoom(roomId)?.getMember(userId)?.membership === membership,
            [
                [this.client, RoomMemberEvent.Membership],
                [this.client, RoomStateEvent.Members],
                [this.client, ClientEvent.Room],
            ],
            timeoutMs,
            `${userId}'s membership '${membership}' in ${roomId}`,
        );
    }

    /** Sends an m.text message (`extra` merged into the content); returns the event ID. */
    async sendText(roomId, body, extra = {}) {
        return this.sendEvent(roomId, "m.room.message", { msgtype: "m.text", body, ...extra });
    }

    /** Sends any message event (encrypted if the room is); returns the event ID. */
    async sendEvent(roomId, type, content) {
        const { event_id } = await this.client.sendEvent(roomId, type, content);
        return event_id;
    }

    /**
     * Megolm-encrypts an event of any type with this client's own session and sends it as m.room.encrypted, as a
     * client with bad intent could: js-sdk itself never encrypts some types (m.room.redaction, m.reaction), so this
     * encrypts through the Rust crypto layer and sends the ciphertext. Returns the event ID.
     */
    async sendEncrypted(roomId, type, content) {
        const room = this.client.getRoom(roomId);
        if (!room) throw new Error(`sendEncrypted: ${this.userId} does not know room ${roomId}`);
        const ev = new sdk.MatrixEvent({ type, content, room_id: roomId, sender: this.userId });
        await this.crypto.encryptEvent(ev, room);
        if (ev.getWireType() !== "m.room.encrypted") throw new Error(`sendEncrypted: ${type} was not encrypted`);
        return this.sendEvent(roomId, "m.room.encrypted", ev.getWireContent());
    }

    /**
     * Sends a message event straight through PUT /send, unencrypted and without js-sdk's handling of its type
     * (js-sdk sends m.room.redaction through /redact). Returns { status, body } with the server's answer.
     */
    async sendRaw(roomId, type, content) {
        const txn = `raw-${randomSuffix()}${Date.now()}`;
        const url = `${this.hsUrl}/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/send/${encodeURIComponent(type)}/${txn}`;
        return request("PUT", url, content, { token: this.accessToken, okStatuses: [200, 400, 403] });
    }

    async sendState(roomId, type, content, stateKey = "") {
        const { event_id } = await this.client.sendStateEvent(roomId, type, content, stateKey);
        return event_id;
    }

    /** Sends an m.reaction annotation (js-sdk sends reactions unencrypted even in encrypted rooms). */
    async react(roomId, eventId, key) {
        return this.sendEvent(roomId, EventType.Reaction, {
            "m.relates_to": { rel_type: "m.annotation", event_id: eventId, key },
        });
    }

    /** Edits `eventId` (m.replace) with a new text body; returns the edit's event ID. */
    async edit(roomId, eventId, newBody) {
        return this.sendEvent(roomId, "m.room.message", {
            msgtype: "m.text",
            body: `* ${newBody}`,
            "m.new_content": { msgtype: "m.text", body: newBody },
            "m.relates_to": { rel_type: "m.replace", event_id: eventId },
        });
    }

    /** Redacts `eventId`; returns the redaction's event ID. */
    async redact(roomId, eventId, reason) {
        const res = await this.client.redactEvent(roomId, eventId, undefined, reason ? { reason } : undefined);
        return res.event_id;
    }

    /** The room's live timeline as MatrixEvents. */
    _timeline(roomId) {
        return this.client.getRoom(roomId)?.getLiveTimeline().getEvents() ?? [];
    }

    /** Decrypted snapshot of the room's live timeline (waits for in-flight decryptions). */
    async events(roomId) {
        const evs = this._timeline(roomId);
        await Promise.all(evs.map((ev) => this.client.decryptEventIfNeeded(ev)));
        return evs.map(plainEvent);
    }

    /**
     * Resolves with the first event in `roomId` (already in the timeline or arriving later) whose plain view
     * (see header) satisfies `predicate`. Encrypted events are offered only once decryption settled; an event that
     * failed to decrypt is offered as type m.room.encrypted with isDecryptionFailure, and again if keys arrive
     * later and it decrypts.
     */
    async waitForEvent(roomId, predicate, timeoutMs = DEFAULT_TIMEOUT, what = "a matching event") {
        let cleanup = () => {};
        const p = new Promise((resolve, reject) => {
            const consider = (ev) => {
                if (!ev || ev.getRoomId() !== roomId) return;
                if (pending(ev)) {
                    this.client.decryptEventIfNeeded(ev).then(() => consider(ev), reject);
                    return;
                }
                let ok;
                try {
                    ok = predicate(plainEvent(ev));
                } catch (e) {
                    reject(e);
                    return;
                }
                if (ok) resolve(plainEvent(ev));
            };
            const onTimeline = (ev) => consider(ev);
            const onDecrypted = (ev) => consider(ev);
            const onRedaction = (_redaction, room) => {
                if (room?.roomId === roomId) for (const ev of this._timeline(roomId)) consider(ev);
            };
            this.client.on(RoomEvent.Timeline, onTimeline);
            this.client.on(MatrixEventEvent.Decrypted, onDecrypted);
            this.client.on(RoomEvent.Redaction, onRedaction);
            cleanup = () => {
                this.client.off(RoomEvent.Timeline, onTimeline);
                this.client.off(MatrixEventEvent.Decrypted, onDecrypted);
                this.client.off(RoomEvent.Redaction, onRedaction);
            };
            for (const ev of this._timeline(roomId)) consider(ev);
        });
        return withTimeout(p, timeoutMs, `${this.userId}: ${what} in ${roomId}`).finally(() => cleanup());
    }

    /** Shortcut: waits for an m.room.message whose body equals `body`. */
    waitForText(roomId, body, timeoutMs = DEFAULT_TIMEOUT) {
        return this.waitForEvent(
            roomId,
            (e) => e.type === "m.room.message" && e.content.body === body,
            timeoutMs,
            `message ${JSON.stringify(body)}`,
        );
    }

    /**
     * Shield info for an event (plain object from waitForEvent/events, MatrixEvent, or event ID): the result of
     * getCrypto().getEncryptionInfoForEvent plus readable names, or null for unencrypted events.
     * { shieldColour, shieldReason, colour: "NONE"|"GREY"|"RED", reason: "UNSIGNED_DEVICE"|...|null }
     */
    async encryptionInfo(event, roomId) {
        let ev = event?.event ?? event;
        if (typeof ev === "string") {
            ev = roomId
                ? this.client.getRoom(roomId)?.findEventById(ev)
                : this.client
                      .getRooms()
                      .map((r) => r.findEventById(ev))
                      .find(Boolean);
            if (!ev) throw new Error(`encryptionInfo: ${this.userId} does not know event ${event}`);
        }
        await this.client.decryptEventIfNeeded(ev);
        const info = await this.crypto.getEncryptionInfoForEvent(ev);
        if (!info) return null;
        return {
            ...info,
            colour: EventShieldColour[info.shieldColour],
            reason: info.shieldReason === null ? null : EventShieldReason[info.shieldReason],
        };
    }

    /**
     * Sets up new cross-signing keys for this user and signs this device. Dendrite asks for password UIA on every
     * device_signing/upload: the first attempt gets 401 + session, the retry sends m.login.password.
     */
    async bootstrapCrossSigning() {
        await this.crypto.bootstrapCrossSigning({
            setupNewCrossSigning: true,
            authUploadDeviceSigningKeys: async (makeRequest) => {
                try {
                    await makeRequest(null);
                } catch (e) {
                    const session = e?.data?.session;
                    if (e?.httpStatus !== 401 || !session) throw e;
                    await makeRequest({
                        type: "m.login.password",
                        identifier: { type: "m.id.user", user: this.userId },
                        password: this.password,
                        session,
                    });
                }
            },
        });
        // The device's new signature is seen only after the client re-queries its own keys (on a later sync).
        await this.waitForDeviceSignedByOwner(this.userId, this.deviceId);
    }

    /** Device verification status as this client sees it (null if the device is unknown). */
    deviceStatus(userId, deviceId) {
        return this.crypto.getDeviceVerificationStatus(userId, deviceId);
    }

    /**
     * Waits until this client knows `userId`'s device `deviceId`. A device logged in a moment ago reaches the
     * other clients' device lists only after their next /sync and /keys/query; cross-signing it before that fails
     * with "Unknown device".
     */
    async waitForDeviceKnown(userId, deviceId, timeoutMs = DEFAULT_TIMEOUT) {
        return this._waitUntil(
            async () => (await this.deviceStatus(userId, deviceId)) !== null,
            [
                [this.client, CryptoEvent.DevicesUpdated],
                [this.client, CryptoEvent.KeysChanged],
                [this.client, ClientEvent.Sync],
            ],
            timeoutMs,
            `device ${userId}/${deviceId} to be known`,
        );
    }

    /**
     * Waits until this client sees `userId`'s device `deviceId` as cross-signed by its owner. Device-list updates
     * come through /sync (device_lists.changed) and a later /keys/query, so re-check on crypto and sync events.
     */
    async waitForDeviceSignedByOwner(userId, deviceId, timeoutMs = DEFAULT_TIMEOUT) {
        return this._waitUntil(
            async () => (await this.deviceStatus(userId, deviceId))?.signedByOwner === true,
            [
                [this.client, CryptoEvent.DevicesUpdated],
                [this.client, CryptoEvent.UserTrustStatusChanged],
                [this.client, CryptoEvent.KeysChanged],
                [this.client, ClientEvent.Sync],
            ],
            timeoutMs,
            `device ${userId}/${deviceId} to be signed by its owner`,
        );
    }

    /**
     * true: OnlySignedDevicesIsolationMode (no keys to, and no messages shown from, devices their owner did not
     * cross-sign); false: AllDevicesIsolationMode (js-sdk's default).
     */
    async setExcludeInsecureDevices(exclude) {
        this.crypto.setDeviceIsolationMode(
            exclude ? new OnlySignedDevicesIsolationMode() : new AllDevicesIsolationMode(false),
        );
    }
}
