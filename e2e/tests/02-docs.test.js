// The README's Synapse set-up is checked here rather than trusted: its homeserver.yaml keys are the ones the
// suite's own Synapse runs with (scripts/synapse.sh config, which 12-homeserver-paths proves working), and every
// ferry log line it quotes is one ferry's code really writes.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { makeTempDir, removeTempDir, repoRoot } from "../lib/util.js";

const readme = fs.readFileSync(path.join(repoRoot, "README.md"), "utf8");
const synapseSection = readme.slice(readme.indexOf("**Synapse (1.163 tested):**"), readme.indexOf("### Devices and trust"));

/** `key: value` pairs of the top-level section `name` in simple block YAML (comments dropped). */
function section(yaml, name) {
    const out = {};
    const lines = yaml.split("\n");
    const at = lines.findIndex((l) => l.replace(/#.*/, "").trimEnd() === `${name}:`);
    assert.ok(at >= 0, `no ${name}: section`);
    for (const line of lines.slice(at + 1)) {
        if (!/^\s/.test(line)) break;
        const m = line.replace(/#.*/, "").match(/^\s+([\w.]+):\s*(.*?)\s*$/);
        if (m) out[m[1]] = m[2];
    }
    return out;
}

test("the README's homeserver.yaml for Synapse is what the suite's Synapse runs with", () => {
    const block = synapseSection.match(/```yaml\n([\s\S]*?)```/);
    assert.ok(block, "the Synapse section shows a homeserver.yaml block");
    const documented = section(block[1], "experimental_features");
    assert.deepEqual(Object.keys(documented).sort(), ["msc2409_to_device_messages_enabled", "msc3202_transaction_extensions"]);
    const dir = makeTempDir("ferry-docs-");
    try {
        execFileSync(path.join(repoRoot, "scripts", "synapse.sh"), ["config", dir, "--port", "8008"], { stdio: "pipe" });
        const generated = section(fs.readFileSync(path.join(dir, "homeserver.yaml"), "utf8"), "experimental_features");
        assert.deepEqual(generated, documented);
        assert.match(block[1], /^app_service_config_files:\n {2}- /m, "the block lists the registration");
    } finally {
        removeTempDir(dir);
    }
});

test("every ferry log line the README's homeserver section quotes is in ferry's code", () => {
    const sources = ["cmd/ferry", "crypto", "bridge"]
        .flatMap((d) => fs.readdirSync(path.join(repoRoot, d)).filter((f) => f.endsWith(".go") && !f.endsWith("_test.go")).map((f) => path.join(repoRoot, d, f)))
        .map((f) => fs.readFileSync(f, "utf8"))
        .join("\n");
    // Quoted log text is in backticks; "..." marks where the line goes on.
    const prose = synapseSection.replace(/```[\s\S]*?```/g, "");
    const quoted = [...prose.matchAll(/`([^`\n]+)`/g)].map((m) => m[1]).filter((q) => q.length >= 30 && /homeserver|ferry/.test(q));
    assert.ok(quoted.length >= 4, `the section quotes ferry's log lines: ${JSON.stringify(quoted)}`);
    for (const q of quoted) {
        for (const part of q.split("...").map((p) => p.trim()).filter(Boolean)) {
            assert.ok(sources.includes(part), `the README quotes "${part}", which ferry's code does not write`);
        }
    }
});
