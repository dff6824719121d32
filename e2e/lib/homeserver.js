// Which homeserver the end-to-end tests run against, and how to start it.
//
// FERRY_E2E_HS=dendrite (default) or synapse selects the server for the whole run; `make test` runs the suite
// once for each. Tests start the homeserver through startHomeserver, so every test runs on both; one that cannot
// apply to a server skips with skipUnless/skipOn and says why (e2e/README.md lists every such skip).
import { DENDRITE_VERSION, startDendrite } from "./dendrite.js";
import { SYNAPSE_VERSION, startSynapse } from "./synapse.js";

const chosen = (process.env.FERRY_E2E_HS || "dendrite").toLowerCase();
if (chosen !== "dendrite" && chosen !== "synapse") {
    throw new Error(`FERRY_E2E_HS=${process.env.FERRY_E2E_HS}: expected dendrite or synapse`);
}

/** "dendrite" or "synapse". */
export const HS = chosen;
export const onSynapse = HS === "synapse";
export const onDendrite = HS === "dendrite";
/** e.g. "Synapse 1.163.2", for test names and messages. */
export const HS_LABEL = onSynapse ? `Synapse ${SYNAPSE_VERSION}` : `Dendrite ${DENDRITE_VERSION}`;

/**
 * ferry's config for this homeserver: on Synapse ferry runs with appservice-mode encryption (MSC2409 to-device,
 * MSC3202 device lists and key counts, MSC4190 devices); Dendrite 0.13.8 has none of it.
 */
export function ferryConfigFor() {
    return onSynapse ? { encryption: { appservice: true } } : {};
}

/**
 * Starts the selected homeserver with the options of startDendrite / startSynapse (appserviceRegistrations,
 * sharedSecret, serverName, port; appserviceEncryption and postgres apply to Synapse only).
 */
export function startHomeserver(opts = {}) {
    if (onSynapse) return startSynapse(opts);
    const { appserviceEncryption, postgres, ...rest } = opts;
    return startDendrite(rest).then((hs) => ({ kind: "dendrite", ...hs }));
}

/** Skips test context `t` (returns true) unless the homeserver is `kind`; `why` says what the other lacks. */
export function skipUnless(t, kind, why) {
    if (HS === kind) return false;
    t.skip(`${HS_LABEL}: ${why}`);
    return true;
}
