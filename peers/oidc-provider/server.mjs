// schoolslink test/demo OAuth 2.0 authorization server peer.
//
// The `oidc-provider` package (an OpenID-certified server) on 127.0.0.1, set up the way an NHS
// trust's (or NHS England's) token endpoint is used by a system-to-system client:
//   - grant_type=client_credentials only (no browser flows, except in portal mode below);
//   - client authentication by client_secret_basic, or by a signed JWT client assertion
//     (private_key_jwt, RFC 7523) verified against the client's registered JWKS: RS512 (NHS England's
//     signed-JWT auth, `kid` in the header) and ES384 at least;
//   - every access token is for one resource server (RFC 8707 resource indicator, defaulted, so the
//     client need not send `resource`), opaque, with a configurable lifetime;
//   - token introspection (RFC 7662) and revocation (RFC 7009), so a resource server (or a test) can
//     check a token and a test can invalidate one early.
//
// Usage:  node server.mjs [PORT] [--exit-on-stdin-close] [--clients FILE] [--portal-accounts FILE]
//   PORT (or env OIDC_PORT): 0 (default) picks a free port.
//   --exit-on-stdin-close (or env OIDC_EXIT_ON_STDIN_CLOSE=1): exit when stdin reaches EOF, so the
//     server dies with the process that started it (that process holds the pipe's other end).
//   --clients FILE (or env OIDC_CLIENTS_FILE): a JSON array of client metadata objects (oidc-provider
//     / RFC 7591 names: client_id, client_secret, token_endpoint_auth_method, jwks, scope, ...).
//     grant_types defaults to ["client_credentials"], response_types and redirect_uris to [].
//   env OIDC_TOKEN_TTL: access token lifetime in seconds (default 300).
//   env OIDC_RESOURCE: the resource indicator / audience of issued tokens (default urn:schoolslink:fhir).
//   env OIDC_RESOURCE_SCOPE: the scopes that resource server knows (default "system/*.read system/*.write").
//   env OIDC_MAX_ASSERTION_LIFETIME: longest accepted client assertion, exp - iat in seconds (default 300,
//     as NHS England's token endpoint enforces).
//
// Portal mode (the school portal's sign-in, DfE Sign-in style): env OIDC_PORTAL_ACCOUNTS (or
// --portal-accounts FILE) names a JSON object {login: {claims...}} of test users, e.g.
//   {"dsl-a": {"email": "dsl.a@school.example", "organisation": {"id": "...", "name": "...", "urn": "900001"},
//              "schoolslink_role": "dsl"}}
// and then, besides everything above: the authorization code flow for clients registered with
// grant_types ["authorization_code"] (PKCE S256 required for every authorization request); oidc-provider's
// development login and consent pages at /interaction/<uid> (any password: the login names the account; an
// unknown login is refused); scopes openid, email, profile, organisation (claim `organisation`) and
// schoolslink (claim `schoolslink_role`); those claims in the ID token itself (conformIdTokenClaims off,
// as DfE Sign-in gives the organisation in the ID token). Without it, nothing of this is enabled.
//
// Listens on 127.0.0.1 only; the issuer is http://127.0.0.1:<port> (plain HTTP is allowed by
// oidc-provider for any issuer; it is only acceptable here because this is a loopback test peer).
// When ready, prints exactly one line on stdout: `LISTENING <port>`; the library's own notices go to
// stderr. Endpoints: /token, /token/introspection, /token/revocation, /jwks, /.well-known/openid-configuration.
//
// Runtime: Node >= 20.18 (oidc-provider 9 uses URL.parse). On Node 20 oidc-provider prints an
// "Unsupported runtime" warning (it targets 22 LTS and later); it works, and tests/integration/
// test_fhir_auth.py runs it there.
//
// No request logging: requests carry client secrets, client assertions and tokens. stderr only gets
// start-up notices and, for a refused client or grant, the OAuth error code and oidc-provider's fixed
// reason text (e.g. "alg mismatch", "signature verification failed"), never a parameter value.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

// oidc-provider prints notices with console.info/console.log; keep stdout for the LISTENING line.
console.info = (...a) => console.error(...a);
console.log = (...a) => console.error(...a);

const args = process.argv.slice(2);
const portArg = args.find((a) => /^\d+$/.test(a));
const port = Number.parseInt(portArg ?? process.env.OIDC_PORT ?? '0', 10);
const exitOnStdinClose = args.includes('--exit-on-stdin-close') || process.env.OIDC_EXIT_ON_STDIN_CLOSE === '1';
const clientsIdx = args.indexOf('--clients');
const clientsFile = clientsIdx >= 0 ? args[clientsIdx + 1] : process.env.OIDC_CLIENTS_FILE;
const tokenTtl = Number.parseInt(process.env.OIDC_TOKEN_TTL ?? '300', 10);
const resource = process.env.OIDC_RESOURCE ?? 'urn:schoolslink:fhir';
const resourceScope = process.env.OIDC_RESOURCE_SCOPE ?? 'system/*.read system/*.write';
const maxAssertionLifetime = Number.parseInt(process.env.OIDC_MAX_ASSERTION_LIFETIME ?? '300', 10);
const portalIdx = args.indexOf('--portal-accounts');
const portalAccountsFile = portalIdx >= 0 ? args[portalIdx + 1] : process.env.OIDC_PORTAL_ACCOUNTS;

// Client assertion algorithms accepted (the default list lacks RS512 and ES384).
const CLIENT_AUTH_ALGS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'Ed25519', 'EdDSA'];

function loadClients() {
  if (!clientsFile) return [];
  let parsed;
  try {
    parsed = JSON.parse(readFileSync(clientsFile, 'utf8'));
  } catch (err) {
    // Not err.message: for a malformed file it quotes the text around the error (maybe a secret).
    throw new TypeError(`cannot read the clients file as JSON (${err?.name ?? 'Error'})`);
  }
  const list = Array.isArray(parsed) ? parsed : parsed.clients;
  if (!Array.isArray(list)) throw new TypeError('clients file must hold a JSON array of client metadata');
  return list.map((c) => ({
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    ...c,
  }));
}

function loadPortalAccounts() {
  if (!portalAccountsFile) return null;
  let parsed;
  try {
    parsed = JSON.parse(readFileSync(portalAccountsFile, 'utf8'));
  } catch (err) {
    throw new TypeError(`cannot read the portal accounts file as JSON (${err?.name ?? 'Error'})`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new TypeError('portal accounts file must hold a JSON object {login: {claims}}');
  }
  return parsed;
}

// The school portal's sign-in: what portal mode adds to the provider's configuration.
function portalConfiguration(accounts) {
  return {
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'given_name', 'family_name'],
      organisation: ['organisation'],
      schoolslink: ['schoolslink_role'],
    },
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    findAccount: async (_ctx, id) => {
      const claims = Object.hasOwn(accounts, id) ? accounts[id] : null;
      if (!claims) return undefined;
      return { accountId: id, claims: async () => ({ ...claims, sub: id }) };
    },
  };
}

function buildProvider(issuer, clients, portalAccounts) {
  // A fresh signing key per start (access tokens are opaque; in portal mode it signs the ID tokens).
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingKey = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'peer-rs256' };

  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    enabledJWA: { clientAuthSigningAlgValues: CLIENT_AUTH_ALGS },
    ...(portalAccounts ? portalConfiguration(portalAccounts) : {}),
    features: {
      devInteractions: { enabled: Boolean(portalAccounts) },
      clientCredentials: { enabled: true },
      // Any authenticated (confidential) client may introspect, as a resource server would.
      introspection: { enabled: true, allowedPolicy: async (_ctx, client) => client.clientAuthMethod !== 'none' },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Portal mode: a browser sign-in's access token is for userinfo only (no resource).
        defaultResource: async (_ctx, client, oneOf) => oneOf
          ?? (portalAccounts && !client.grantTypeAllowed('client_credentials') ? undefined : resource),
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator) => {
          if (indicator !== resource) {
            throw new Provider.errors.InvalidTarget();
          }
          return { scope: resourceScope, audience: resource, accessTokenTTL: tokenTtl, accessTokenFormat: 'opaque' };
        },
      },
    },
    ttl: {
      ClientCredentials: () => tokenTtl,
      AccessToken: () => tokenTtl,
    },
    // NHS England's token endpoint also insists on a kid and on a short-lived assertion.
    assertJwtClientAuthClaimsAndHeader: async (_ctx, claims, header) => {
      if (!header.kid) {
        throw new Provider.errors.InvalidClientAuth('kid must be provided in the client_assertion JWT header');
      }
      if (claims.sub !== claims.iss) {
        throw new Provider.errors.InvalidClientAuth('sub must equal iss in the client_assertion JWT');
      }
      const iat = typeof claims.iat === 'number' ? claims.iat : Math.floor(Date.now() / 1000);
      if (claims.exp - iat > maxAssertionLifetime) {
        throw new Provider.errors.InvalidClientAuth('client_assertion JWT lifetime is too long');
      }
    },
  });

  // Log only the error code and oidc-provider's fixed reason text.
  const onError = (event) => (ctx, err) => {
    const detail = err?.error_detail ?? err?.cause?.code ?? '';
    process.stderr.write(`oidc-peer: ${event} ${err?.error ?? err?.name ?? 'error'}${detail ? ` (${detail})` : ''}\n`);
  };
  for (const event of ['grant.error', 'introspection.error', 'revocation.error', 'discovery.error', 'jwks.error',
    'authorization.error', 'userinfo.error']) {
    provider.on(event, onError(event));
  }
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`oidc-peer: server_error ${err?.name ?? 'Error'}\n${(err?.stack ?? '').split('\n').slice(1).join('\n')}\n`);
  });
  return provider;
}

async function main() {
  const clients = loadClients();
  const portalAccounts = loadPortalAccounts();
  const server = createServer();
  server.headersTimeout = 30_000;

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

  // The issuer names the port, which is only known once listening (port 0 = any free port).
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  const actual = server.address().port;
  const provider = buildProvider(`http://127.0.0.1:${actual}`, clients, portalAccounts);
  server.on('request', provider.callback());
  process.stderr.write(
    `oidc-peer: issuer http://127.0.0.1:${actual}; ${clients.length} client(s); token ttl ${tokenTtl}s; resource ${resource}`
    + `${portalAccounts ? `; portal mode, ${Object.keys(portalAccounts).length} account(s)` : ''}\n`
  );
  process.stdout.write(`LISTENING ${actual}\n`);
}

main().catch((err) => {
  process.stderr.write(`oidc-peer: failed to start: ${err?.name ?? 'Error'}: ${err?.message ?? err}\n`);
  process.exit(1);
});
