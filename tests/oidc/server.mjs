// A Keycloak-shaped OpenID Connect provider for keygate's integration tests.
//
// npm `oidc-provider` mounted at /realms/<realm> with Keycloak's endpoint paths,
// issuing JWT access tokens shaped like Keycloak's (typ "Bearer", azp,
// preferred_username, realm_access, resource_access, scope, aud with the
// resource audience). Adds what Keycloak has and oidc-provider does not:
//
// * a password grant (Resource Owner Password Credentials) for the test users;
// * introspection and revocation of JWT access tokens (oidc-provider only
//   introspects opaque ones, and this provider issues none): revoked jti are
//   remembered in memory;
// * key rotation: keys come from a JWKS file, the first key signs, the others
//   are still published, so a restart with [new, old] is Keycloak's rotation;
// * a login page (user name and password form) for the authorization code flow
//   of a client given redirect_uris (the portal's), which also gets refresh
//   tokens as Keycloak's clients do, and logout through end_session.
//
// Usage: node server.mjs CONFIG.json   (or KEYGATE_OIDC_CONFIG=CONFIG.json)
// CONFIG: {"port": 0, "realm": "iot", "audience": "iot-proxy", "keys_file": "...",
//          "access_token_ttl": 300, "users": [...], "clients": [...]}
// When listening it prints one line: READY {"issuer": ..., "port": ...}

import * as fs from 'node:fs';
import * as http from 'node:http';
import * as crypto from 'node:crypto';

import Provider, { errors } from 'oidc-provider';
import * as jose from 'jose';

const configPath = process.argv[2] || process.env.KEYGATE_OIDC_CONFIG;
const config = configPath ? JSON.parse(fs.readFileSync(configPath, 'utf8')) : {};
const realm = config.realm || 'iot';
const audience = config.audience || 'iot-proxy';
const resourceIndicator = `urn:keygate:resource:${audience}`;
const accessTokenTTL = config.access_token_ttl || 300;
const prefix = `/realms/${realm}`;

const users = new Map((config.users || []).map((u) => [u.username, {
  sub: u.sub || crypto.randomUUID(),
  roles: [], client_roles: {}, groups: [], ...u,
}]));
const usersBySub = new Map([...users.values()].map((u) => [u.sub, u]));
// Service accounts: roles of a confidential client's own tokens (client_credentials).
const serviceRoles = new Map((config.clients || []).map((c) => [c.client_id, c.service_roles || []]));
const serviceClientRoles = new Map((config.clients || []).map((c) => [c.client_id, c.service_client_roles || {}]));

async function loadKeys() {
  if (config.keys_file) {
    return JSON.parse(fs.readFileSync(config.keys_file, 'utf8'));
  }
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { keys: [{ ...jwk, kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' }] };
}

function realmAccess(roles) {
  return { roles: [...roles, `default-roles-${realm}`] };
}

function resourceAccess(clientRoles) {
  const out = {};
  for (const [client, roles] of Object.entries(clientRoles)) out[client] = { roles };
  return out;
}

function userClaims(user, clientId) {
  return {
    typ: 'Bearer',
    azp: clientId,
    preferred_username: user.username,
    email: user.email || `${user.username}@example.org`,
    email_verified: true,
    realm_access: realmAccess(user.roles),
    resource_access: resourceAccess(user.client_roles),
    groups: user.groups.map((g) => (g.startsWith('/') ? g : `/${g}`)),
  };
}

function serviceClaims(clientId) {
  return {
    typ: 'Bearer',
    azp: clientId,
    preferred_username: `service-account-${clientId}`,
    client_id: clientId,
    realm_access: realmAccess(serviceRoles.get(clientId) || []),
    resource_access: resourceAccess(serviceClientRoles.get(clientId) || {}),
  };
}

function clientMetadata(c) {
  const confidential = Boolean(c.secret);
  if (c.redirect_uris) {  // a browser client: authorization code (PKCE: required for public clients)
    return {
      client_id: c.client_id,
      ...(confidential ? { client_secret: c.secret, token_endpoint_auth_method: 'client_secret_basic' }
        : { token_endpoint_auth_method: 'none' }),
      grant_types: ['authorization_code', 'refresh_token', 'password'],
      response_types: ['code'],
      redirect_uris: c.redirect_uris,
      post_logout_redirect_uris: c.post_logout_redirect_uris || [],
    };
  }
  return {
    client_id: c.client_id,
    ...(confidential ? { client_secret: c.secret, token_endpoint_auth_method: 'client_secret_basic' }
      : { token_endpoint_auth_method: 'none' }),
    grant_types: c.grant_types || (confidential ? ['client_credentials', 'password'] : ['password']),
    response_types: [],
    redirect_uris: [],
  };
}

const keys = await loadKeys();
const signingKey = keys.keys[0];
const publicJwks = {
  keys: keys.keys.map(({ d, p, q, dp, dq, qi, ...pub }) => pub),
};
const localJwks = jose.createLocalJWKSet(publicJwks);
const revokedJti = new Set();

let handler = null;
const server = http.createServer((req, res) => {
  if (!handler) {
    res.writeHead(503).end();
    return;
  }
  handler(req, res).catch((err) => {
    console.error('request failed', err);
    if (!res.headersSent) res.writeHead(500).end();
  });
});
await new Promise((resolve) => { server.listen(config.port || 0, '127.0.0.1', resolve); });
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}${prefix}`;

function resourceServerInfo() {
  return {
    audience,
    scope: 'openid profile email roles',
    accessTokenTTL,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: signingKey.alg || 'RS256', kid: signingKey.kid } },
  };
}

const provider = new Provider(issuer, {
  clients: (config.clients || []).map(clientMetadata),
  jwks: keys,
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  scopes: ['openid', 'profile', 'email', 'roles', 'offline_access'],
  interactions: { url: (ctx, interaction) => `${prefix}/interaction/${interaction.uid}` },
  // Keycloak gives a code-flow client a refresh token without offline_access.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: { AccessToken: accessTokenTTL, ClientCredentials: accessTokenTTL, RefreshToken: config.refresh_token_ttl || 1800,
    Session: 3600, Grant: 3600, Interaction: 600 },
  routes: {
    authorization: '/protocol/openid-connect/auth',
    jwks: '/protocol/openid-connect/certs',
    token: '/protocol/openid-connect/token',
    introspection: '/protocol/openid-connect/token/introspect',
    revocation: '/protocol/openid-connect/revoke',
    userinfo: '/protocol/openid-connect/userinfo',
    end_session: '/protocol/openid-connect/logout',
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resourceIndicator,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== resourceIndicator) throw new errors.InvalidTarget();
        return resourceServerInfo();
      },
    },
  },
  extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials') return serviceClaims(token.clientId);
    const user = usersBySub.get(token.accountId);
    return user ? userClaims(user, token.clientId) : { typ: 'Bearer', azp: token.clientId };
  },
  formats: {
    customizers: {
      jwt(ctx, token, jwt) {
        // Keycloak: user tokens carry no client_id and list their audiences;
        // service-account tokens carry client_id and a single audience string.
        if (token.kind === 'AccessToken') {
          // rfc9068: keep the client_id RFC 9068 makes a claim of every JWT access token.
          if (!config.rfc9068) delete jwt.payload.client_id;
          jwt.payload.aud = [audience, 'account'];
        } else {
          jwt.payload.sub = serviceSub(token.clientId);
        }
      },
    },
  },
});

function serviceSub(clientId) {
  const h = crypto.createHash('sha256').update(`service-account:${realm}:${clientId}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

// Resource Owner Password Credentials, as Keycloak's "direct access grants".
provider.registerGrantType('password', async (ctx, next) => {
  const { client, params } = ctx.oidc;
  const user = users.get(params.username);
  if (!user || user.password !== params.password) {
    throw new errors.InvalidGrant('invalid user credentials');
  }
  const scope = params.scope || 'openid profile email';
  const { AccessToken, ResourceServer } = ctx.oidc.provider;
  const ttl = params.ttl ? Number(params.ttl) : undefined;
  const token = new AccessToken({
    accountId: user.sub,
    client,
    scope,
    gty: 'password',
    resourceServer: new ResourceServer(resourceIndicator, resourceServerInfo()),
    ...(ttl ? { expiresIn: ttl } : {}),
  });
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    expires_in: token.expiration,
    token_type: 'Bearer',
    scope,
  };
  await next();
}, ['username', 'password', 'scope', 'ttl']);

provider.on('server_error', (ctx, err) => console.error('server_error', err));

// ---------------------------------------------------------------- JWT introspection / revocation

const clientsById = new Map((config.clients || []).map((c) => [c.client_id, c]));

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function authenticatedClient(req, form) {
  let id = form.get('client_id');
  let secret = form.get('client_secret');
  const auth = req.headers.authorization || '';
  if (auth.startsWith('Basic ')) {
    const decoded = Buffer.from(auth.slice(6), 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    id = decodeURIComponent(decoded.slice(0, i));
    secret = decodeURIComponent(decoded.slice(i + 1));
  }
  const client = clientsById.get(id);
  if (!client || !client.secret || client.secret !== secret) return null;
  return client;
}

async function verifyOwnJwt(token) {
  try {
    const { payload } = await jose.jwtVerify(token, localJwks, { issuer });
    return payload;
  } catch {
    return null;
  }
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

async function jwtEndpoints(req, res, path) {
  const isIntrospect = path === '/protocol/openid-connect/token/introspect';
  const isRevoke = path === '/protocol/openid-connect/revoke';
  if (req.method !== 'POST' || !(isIntrospect || isRevoke)) return false;
  const body = await readBody(req);
  const form = new URLSearchParams(body.toString('utf8'));
  const token = form.get('token') || '';
  const client = authenticatedClient(req, form);
  if (!client) {
    json(res, 401, { error: 'invalid_client', error_description: 'client authentication failed' });
    return true;
  }
  // Every access token this provider issues is a JWT: anything else is not ours.
  const payload = token.split('.').length === 3 ? await verifyOwnJwt(token) : null;
  if (isRevoke) {
    if (payload?.jti) revokedJti.add(payload.jti);
    res.writeHead(200).end();
    return true;
  }
  if (!payload || revokedJti.has(payload.jti)) {
    json(res, 200, { active: false });
    return true;
  }
  json(res, 200, {
    ...payload,
    active: true,
    client_id: payload.client_id || payload.azp,
    username: payload.preferred_username,
    token_type: 'Bearer',
  });
  return true;
}

// ---------------------------------------------------------------- the login page

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

function loginPage(res, uid, message) {
  res.writeHead(message ? 401 : 200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(`<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head><body>
<main><h1>Sign in to ${escapeHtml(realm)}</h1>${message ? `<p role="alert">${escapeHtml(message)}</p>` : ''}
<form method="post" action="${prefix}/interaction/${escapeHtml(uid)}/login">
<p><label for="username">User name</label> <input id="username" name="username" autocomplete="username" required></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password"
 autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p></form></main></body></html>`);
}

async function interactionRoutes(req, res, path) {
  const match = path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!match) return false;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== match[1]) throw new errors.InvalidRequest('interaction mismatch');
  if (req.method === 'GET' && !match[2]) {
    loginPage(res, details.uid, '');
    return true;
  }
  if (req.method !== 'POST' || !match[2]) {
    json(res, 405, { error: 'method not allowed' });
    return true;
  }
  const form = new URLSearchParams((await readBody(req)).toString('utf8'));
  const user = users.get(form.get('username') || '');
  if (!user || user.password !== form.get('password')) {
    loginPage(res, details.uid, 'Invalid user name or password.');
    return true;
  }
  const grant = new provider.Grant({ accountId: user.sub, clientId: details.params.client_id });
  grant.addOIDCScope(String(details.params.scope || 'openid'));
  grant.addResourceScope(resourceIndicator, 'openid profile email');
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { login: { accountId: user.sub }, consent: { grantId } },
    { mergeWithLastSubmission: false });
  return true;
}

const callback = provider.callback();
handler = async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (!url.pathname.startsWith(`${prefix}/`)) {
    json(res, 404, { error: 'not found' });
    return;
  }
  const path = url.pathname.slice(prefix.length);
  if (await jwtEndpoints(req, res, path)) return;
  if (await interactionRoutes(req, res, path)) return;
  req.originalUrl = req.url;
  req.url = req.url.slice(prefix.length);
  await callback(req, res);
};

process.on('SIGTERM', () => { server.close(); process.exit(0); });
// Started by the test rig with a pipe on stdin: when the rig's process dies, so does this one.
if (process.env.KEYGATE_OIDC_EXIT_WITH_STDIN === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
process.stdout.write(`READY ${JSON.stringify({ issuer, port, kid: signingKey.kid })}\n`);
