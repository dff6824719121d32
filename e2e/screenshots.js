// `scripts/screenshots.sh`: real screenshots of a linked conversation in a desktop client. A homeserver (Synapse by
// default, FERRY_E2E_HS=dendrite for Dendrite) and ferry run on 127.0.0.1; Alice and Bob, each with an avatar and
// a cross-signed device and secret storage behind a recovery key, talk in their own encrypted rooms (Garden and
// Kitchen, with room avatars) that ferry links. Each also has an nheko session, logged in by token (its settings
// seeded, secrets kept in its settings file since there is no keyring), started before the rooms exist and unlocked
// with the recovery key through nheko's own dialog, so it decrypts and trusts what it shows. The two nheko windows
// run side by side on an Xvfb screen; once each shows its room with the whole conversation, the screen is taken with
// ImageMagick's `import` into docs/screenshots/ (FERRY_SHOTS_DIR elsewhere). FERRY_SHOTS_HOLD=1 keeps it all running.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { HS_LABEL } from "./lib/homeserver.js";
import { createUser, passwordLogin } from "./lib/users.js";
import { inviteBot, linkByRequest, startStack } from "./lib/stack.js";
import { keepArtifacts, makeTempDir, pollUntil, removeTempDir, repoRoot, sleep, spawnTracked } from "./lib/util.js";

const say = (...a) => console.log("screenshots:", ...a);
const outDir = process.env.FERRY_SHOTS_DIR ?? path.join(repoRoot, "docs", "screenshots");
const hold = process.env.FERRY_SHOTS_HOLD === "1"; // keep everything running afterwards (for looking around)

// The screen: two nheko windows side by side.
const WIN = { width: 960, height: 800 };
const SCREEN = { width: WIN.width * 2, height: WIN.height };

// The font of the avatars' letters (Debian's fonts-dejavu-core, which nheko's packages bring).
const AVATAR_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";

const tools = ["Xvfb", "nheko", "import", "convert", "xdotool"];
for (const t of tools) {
    try {
        execFileSync("sh", ["-c", `command -v ${t}`], { stdio: "ignore" });
    } catch {
        throw new Error(`${t} is missing: scripts/screenshots.sh installs it`);
    }
}

const work = makeTempDir("ferry-shots-");
let stack, alice, bob;
const procs = [];
async function shutdown(code) {
    for (const p of procs.reverse()) await p.stop("SIGTERM", 5000).catch(() => {});
    await Promise.all([alice?.stop(), bob?.stop()]);
    await stack?.stop();
    if (!keepArtifacts) removeTempDir(work);
    else say(`kept ${work}`);
    process.exit(code);
}
process.on("SIGINT", () => shutdown(130));
process.on("SIGTERM", () => shutdown(143));

/** A square PNG avatar: a colour gradient with a letter, made with ImageMagick. */
function avatar(name, letter, from, to) {
    const file = path.join(work, `${name}.png`);
    execFileSync("convert", ["-size", "256x256", `gradient:${from}-${to}`, "-font", AVATAR_FONT, "-gravity", "center", "-pointsize", "150", "-fill", "white", "-annotate", "+0+0", letter, file]);
    return fs.readFileSync(file);
}

async function upload(user, name, data) {
    const { content_uri } = await user.client.uploadContent(data, { type: "image/png", name: `${name}.png` });
    return content_uri;
}

/** Starts Xvfb on a free display; returns ":N". */
async function startXvfb() {
    const log = path.join(work, "xvfb.log");
    const xvfb = spawnTracked("/usr/bin/Xvfb", ["-displayfd", "1", "-screen", "0", `${SCREEN.width}x${SCREEN.height}x24`, "-nolisten", "tcp"], { logFile: log });
    procs.push(xvfb);
    const display = await pollUntil(() => fs.readFileSync(log, "utf8").match(/^(\d+)$/m)?.[1], { timeoutMs: 10000, what: "Xvfb to start" });
    return `:${display}`;
}

/** Writes nheko's settings: the profile's login (by token), and secrets kept in the file (no keyring here). */
function seedNheko(home, profiles) {
    const dir = path.join(home, ".config", "nheko");
    fs.mkdirSync(dir, { recursive: true });
    const lines = ["[General]", "run_without_secure_secrets_service=true", "", "[user]"];
    // A plain look: no tray, no desktop notifications, the light theme, read receipts and typing shown.
    lines.push("theme=light", "desktop_notifications=false", "window\\tray=false", "read_receipts=true", "typing_notifications=true", "");
    lines.push("[profile]");
    // QSettings reads a value starting with "@" as a typed value unless the "@" is doubled.
    const value = (v) => (v.startsWith("@") ? `@${v}` : v);
    for (const [name, login] of Object.entries(profiles)) {
        lines.push(`${name}\\auth\\access_token=${value(login.accessToken)}`);
        lines.push(`${name}\\auth\\home_server=${value(login.hsUrl)}`);
        lines.push(`${name}\\auth\\user_id=${value(login.userId)}`);
        lines.push(`${name}\\auth\\device_id=${value(login.deviceId)}`);
    }
    fs.writeFileSync(path.join(dir, "nheko.conf"), lines.join("\n") + "\n");
}

function startNheko(home, display, profile) {
    const env = { ...process.env, HOME: home, DISPLAY: display, XDG_RUNTIME_DIR: path.join(home, "run"), QT_QPA_PLATFORM: "xcb", LANG: "C.UTF-8" };
    fs.mkdirSync(env.XDG_RUNTIME_DIR, { recursive: true, mode: 0o700 });
    const p = spawnTracked("/usr/bin/nheko", ["-p", profile, "-L", "stderr"], { logFile: path.join(work, `nheko-${profile}.log`), env });
    procs.push(p);
    return p;
}

// Where nheko 0.11's controls are in a window of WIN's size (Xvfb has no window manager and renders alike
// every time): the "enter passphrase" button of its "Activate Encryption" dialog, and the first room of its room list.
const UI = { enterPassphrase: ["475", "241"], firstRoom: ["122", "77"] };

/** The visible window named `name` (a dialog), or null. */
function findWindow(display, name) {
    try {
        return xdotool(display, "search", "--onlyvisible", "--name", `^${name}$`).split("\n").filter(Boolean)[0] ?? null;
    } catch {
        return null;
    }
}

function xdotool(display, ...args) {
    return execFileSync("xdotool", args, { env: { ...process.env, DISPLAY: display }, encoding: "utf8" }).trim();
}

/** The X window of a process (its largest visible one). */
async function windowOf(display, pid) {
    return pollUntil(
        () => {
            try {
                return xdotool(display, "search", "--onlyvisible", "--pid", String(pid)).split("\n").filter(Boolean).at(-1);
            } catch {
                return null;
            }
        },
        { timeoutMs: 30000, what: `nheko's window (pid ${pid})` },
    );
}

function shoot(display, file, windowId = "root") {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    execFileSync("import", ["-window", windowId, file], { env: { ...process.env, DISPLAY: display } });
    say(`wrote ${path.relative(repoRoot, file)}`);
}

try {
    say(`starting ${HS_LABEL} and ferry on 127.0.0.1`);
    stack = await startStack({ db: "sqlite" });
    if (stack.hs.kind === "synapse") {
        // nheko 0.11 (Debian 12's) loads avatars through the unauthenticated media API, which Synapse now serves
        // only when authenticated media is not enforced.
        fs.appendFileSync(stack.hs.configPath, "\nenable_authenticated_media: false\n");
        await stack.hs.restart();
    }
    const password = "ferry-screenshots";
    // Each client answers secret storage with the key it created (below).
    const ssssKeys = {};
    const callbacks = (name) => ({ getSecretStorageKey: async ({ keys }) => [Object.keys(keys)[0], ssssKeys[name].privateKey] });
    [alice, bob] = await Promise.all([
        createUser(stack.hs.url, "alice", { password, displayName: "Alice", cryptoCallbacks: callbacks("alice") }),
        createUser(stack.hs.url, "bob", { password, displayName: "Bob", cryptoCallbacks: callbacks("bob") }),
    ]);
    await Promise.all([alice.bootstrapCrossSigning(), bob.bootstrapCrossSigning()]);
    // Secret storage with a recovery key, as Element sets it up: nheko's session unlocks the identity with it.
    const recovery = {};
    for (const [name, user] of [["alice", alice], ["bob", bob]]) {
        const key = await user.crypto.createRecoveryKeyFromPassphrase();
        ssssKeys[name] = key;
        await user.crypto.bootstrapSecretStorage({ createSecretStorageKey: async () => key, setupNewSecretStorage: true });
        recovery[name] = key.encodedPrivateKey;
    }
    await alice.client.setAvatarUrl(await upload(alice, "alice", avatar("alice", "A", "#f6a", "#a3f")));
    await bob.client.setAvatarUrl(await upload(bob, "bob", avatar("bob", "B", "#3cf", "#36c")));
    // The bot wears an avatar from ferry's config (appservice.bot.avatar, here from the environment).
    process.env.FERRY_APPSERVICE_BOT_AVATAR = await upload(alice, "ferry", avatar("ferry", "f", "#8ad", "#246"));
    await stack.restartFerry();

    // nheko sessions, logged in by token, started before the rooms exist: they get the keys of everything said there.
    const home = path.join(work, "home");
    const logins = {};
    for (const [name, user] of [["alice", alice], ["bob", bob]]) {
        const login = await passwordLogin(stack.hs.url, user.userId, password, "nheko");
        logins[name] = { ...login, hsUrl: stack.hs.url };
    }
    seedNheko(home, logins);
    const display = await startXvfb();
    const users = { alice, bob };
    const windows = {};
    for (const [i, name] of ["alice", "bob"].entries()) {
        const nheko = startNheko(home, display, name);
        windows[name] = await windowOf(display, nheko.proc.pid);
        xdotool(display, "windowsize", windows[name], String(WIN.width), String(WIN.height));
        xdotool(display, "windowmove", windows[name], String(i * WIN.width), "0");
        // nheko asks how to unlock the account's identity: with the recovery key, as a user would.
        let prompt = null;
        for (let tries = 0; !prompt; tries++) {
            if (tries === 10) throw new Error(`${name}'s nheko did not ask for the recovery key`);
            await sleep(3000); // its first sync, then the dialog
            xdotool(display, "mousemove", "--window", windows[name], ...UI.enterPassphrase, "click", "1");
            prompt = await pollUntil(() => findWindow(display, "Decrypt secrets"), { timeoutMs: 5000, what: "the recovery key prompt" }).catch(() => null);
        }
        xdotool(display, "type", "--window", prompt, "--delay", "10", recovery[name]);
        await sleep(500);
        xdotool(display, "key", "Return"); // the prompt has the focus
        await users[name].waitForDeviceSignedByOwner(users[name].userId, logins[name].deviceId, 60000);
        say(`${name}'s nheko session unlocked the identity and signed itself`);
    }
    // Both sessions' signatures reach ferry before anyone speaks: ferry shares room keys with cross-signed devices.
    await sleep(3000);

    const roomAvatar = async (user, name, letter, from, to) => ({ type: "m.room.avatar", state_key: "", content: { url: await upload(user, name, avatar(name, letter, from, to)) } });
    const roomA = await alice.createEncryptedRoom({ name: "Garden", extra: { initial_state: [await roomAvatar(alice, "garden", "G", "#7d5", "#292")] } });
    const roomB = await bob.createEncryptedRoom({ name: "Kitchen", extra: { initial_state: [await roomAvatar(bob, "kitchen", "K", "#fc6", "#c63")] } });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkByRequest(stack, alice, roomA, bob, roomB);
    say("Garden and Kitchen are linked");

    // The conversation, from the users' own (js-sdk) devices.
    await alice.waitForEvent(roomA, (e) => e.sender === stack.botUserId && /now linked with/.test(e.content.body ?? ""), 30000, "the link's announcement");
    await alice.sendText(roomA, "The tomatoes are finally ripe 🍅");
    const copy = await bob.waitForText(roomB, "The tomatoes are finally ripe 🍅", 30000);
    const reply = await bob.sendText(roomB, "Wonderful! Bring some over, I'll make sauce.", { "m.relates_to": { "m.in_reply_to": { event_id: copy.eventId } } });
    const replyCopy = await alice.waitForText(roomA, "Wonderful! Bring some over, I'll make sauce.", 30000);
    await alice.react(roomA, replyCopy.eventId, "👍");
    await bob.waitForEvent(roomB, (e) => e.type === "m.reaction" && e.content["m.relates_to"]?.event_id === reply, 30000, "alice's reaction");
    await alice.sendText(roomA, "On my way, ten minutes.");
    const last = await bob.waitForText(roomB, "On my way, ten minutes.", 30000);
    await bob.client.sendReadReceipt(last.event);

    // Each nheko opens its room (the first of its room list).
    for (const name of ["alice", "bob"]) xdotool(display, "mousemove", "--window", windows[name], ...UI.firstRoom, "click", "1");
    await sleep(4000); // nheko fetches avatars and lays out the timeline
    // bob starts typing: Garden shows his ghost typing.
    await bob.client.sendTyping(roomB, true, 30000);
    await pollUntil(() => alice.client.getRoom(roomA).getMember(replyCopy.sender)?.typing, { timeoutMs: 30000, what: "bob's ghost typing in Garden" });
    await sleep(2000);
    shoot(display, path.join(outDir, "linked-rooms.png"));
    for (const name of ["alice", "bob"]) shoot(display, path.join(outDir, `${name === "alice" ? "garden" : "kitchen"}-nheko.png`), windows[name]);
    if (hold) {
        say(`holding: DISPLAY=${display}, HOME=${home}, ${stack.hs.url}, recovery keys ${JSON.stringify(recovery)}, windows ${JSON.stringify(windows)}`);
        for (;;) await sleep(60000);
    }
    await shutdown(0);
} catch (e) {
    console.error(`screenshots failed: ${e.stack ?? e}`);
    await shutdown(1);
}
