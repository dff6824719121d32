// Reading ferry's Prometheus metrics in benchmarks and tests: a scrape is a list of samples { name, labels, value }.

/** Parses Prometheus' text format into samples. */
export function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
        const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$/);
        if (!m) continue;
        const labels = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map(([, k, v]) => [k, v]));
        out.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return out;
}

/** Scrapes url; null when ferry does not answer. */
export async function scrape(url) {
    try {
        const resp = await fetch(url, { signal: AbortSignal.timeout(5000) });
        return parseMetrics(await resp.text());
    } catch {
        return null;
    }
}

/** The sum of the samples of name whose labels include labels (NaN without a scrape). */
export const msum = (ms, name, labels = {}) =>
    ms ? ms.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((t, s) => t + s.value, 0) : NaN;

/** Cumulative buckets of a histogram (the series whose labels include labels): [[le, count], ...]. */
export const buckets = (ms, name, labels = {}) =>
    ms
        ? ms
              .filter((s) => s.name === `${name}_bucket` && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
              .map((s) => [Number(s.labels.le), s.value])
              .sort((a, b) => a[0] - b[0])
        : [];
/** Quantile q of the observations between two scrapes of a histogram (upper bucket bound; `prev` null after a
 * restart: the counters started again from zero). */
export function histQuantile(prev, cur, q) {
    const d = cur.map(([le, c], i) => [le, c - (prev?.[i]?.[1] ?? 0)]);
    const total = d.at(-1)?.[1] ?? 0;
    if (total <= 0) return NaN;
    const hit = d.find(([, c]) => c >= q * total);
    return hit ? hit[0] : NaN;
}

/** The share of the observations between two scrapes of a histogram (the series with labels) that were at most
 * le (seconds, a bucket bound), with their count: [share, count]. */
export function histShare(prevMs, curMs, name, le, labels = {}) {
    const prev = buckets(prevMs, name, labels);
    const cur = buckets(curMs, name, labels);
    const d = cur.map(([b, c], i) => [b, c - (prev[i]?.[1] ?? 0)]);
    const total = d.at(-1)?.[1] ?? 0;
    const at = d.find(([b]) => b >= le);
    return [total > 0 && at ? at[1] / total : NaN, total];
}
