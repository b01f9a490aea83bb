// Test-only page (not part of the product): runs the page's JS modules
// against the secure channel's test vectors and the Python reference.
// test/test_web_channel.py loads index.html and calls window.ticryptTests.*
// through selenium; each function returns JSON-able results that the Python
// side compares with what it expects.

import { b64decode, b64encode, hex, unhex } from "/app/js/b64.js";
import { canonical, parseCanonical } from "/app/js/canon.js";
import { Channel, ChannelError, MAX_PLAINTEXT } from "/app/js/channel.js";
import { KeyFileError, importKeyFile } from "/app/js/keyfile.js";
import { signPurpose, signingInput } from "/app/js/signed.js";
import { forgetKey, loadKey, saveKey } from "/app/js/keystore.js";
import { RequestError, SessionError, openVmSession } from "/app/js/session.js";
import { describeClose } from "/app/js/closes.js";
import { CHANNEL_MESSAGES } from "/app/js/channelerror.js";
import { Listeners } from "/app/js/listeners.js";
import { ed25519FromSeed, hkdfSha256, sha256, x25519KeyPair, x25519Shared } from "/app/js/primitives.js";

/** rng(n) handing out `bytes` in order. */
function fixedRng(bytes) {
  let at = 0;
  return (n) => {
    if (at + n > bytes.length) throw new Error("fixed rng exhausted");
    const out = bytes.slice(at, at + n);
    at += n;
    return out;
  };
}

function utf8(s) {
  return new TextEncoder().encode(s);
}

function cat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** The code of what `fn` throws, "accepted" when it does not. */
async function outcome(fn) {
  try {
    await fn();
    return "accepted";
  } catch (e) {
    return e instanceof ChannelError ? e.code : `not a ChannelError: ${e}`;
  }
}

/** Both ends set up with the vectors' keys and rngs. */
async function ends(v, options = {}) {
  const user = await ed25519FromSeed(unhex(v.user_ed25519_seed));
  const vm = await ed25519FromSeed(unhex(v.vm_ed25519_seed));
  const userPub = hex(user.publicKey);
  return {
    user: new Channel({ vmId: v.vm_id, vmKey: vm.publicKey, ...user, rng: fixedRng(unhex(v.user_rng)), ...options }),
    vm: new Channel({
      role: "vm", vmId: v.vm_id, ...vm, rng: fixedRng(unhex(v.vm_rng)), ...options,
      authorize: (key) => hex(key) === userPub,
    }),
    userPub, vmPub: hex(vm.publicKey),
  };
}

/** A channel in `state` (PROTOCOL.md §4 Test vectors), reached with the positive vectors. */
async function receiver(v, state, options) {
  const { user, vm } = await ends(v, options);
  if (state === "vm-waiting-hello") return vm;
  if ((await user.start()) !== v.client_hello) throw new Error("client_hello differs");
  if (state === "user-waiting-hello") return user;
  if ((await vm.receive(v.client_hello)).send[0] !== v.vm_hello) throw new Error("vm_hello differs");
  if (state === "vm-waiting-finish") return vm;
  if ((await user.receive(v.vm_hello)).send[0] !== v.client_finish) throw new Error("client_finish differs");
  if (!(await vm.receive(v.client_finish)).established) throw new Error("vm not established");
  return { "vm-established": vm, "user-established": user }[state];
}

async function vectors() {
  const response = await fetch("/vectors/channel-v1.json");
  return response.json();
}

/** Every positive value of the vectors; returns a list of mismatches. */
async function positive() {
  const v = await vectors();
  const bad = [];
  const check = (name, got, want) => { if (got !== want) bad.push(`${name}: ${got} != ${want}`); };
  const { user, vm, userPub, vmPub } = await ends(v);
  check("user_ed25519_public", userPub, v.user_ed25519_public);
  check("vm_ed25519_public", vmPub, v.vm_ed25519_public);
  check("client_hello", await user.start(), v.client_hello);
  const r1 = await vm.receive(v.client_hello);
  check("vm_hello", r1.send[0], v.vm_hello);
  check("vm established early", r1.established, false);
  const r2 = await user.receive(v.vm_hello);
  check("client_finish", r2.send[0], v.client_finish);
  check("user established", r2.established && user.established, true);
  const r3 = await vm.receive(v.client_finish);
  check("vm established", r3.established && vm.established && r3.send.length === 0, true);
  check("vm peer key", hex(vm.peerKey), v.user_ed25519_public);

  // intermediates, from the messages and the rngs with the same primitives
  const userEph = await x25519KeyPair(unhex(v.user_rng).slice(0, 32));
  const vmEph = b64decode(JSON.parse(v.vm_hello).eph, 32);
  const shared = await x25519Shared(userEph.privateKey, vmEph);
  check("shared", hex(shared), v.shared);
  const vmHello = JSON.parse(v.vm_hello);
  delete vmHello.sig;
  delete vmHello.confirm;
  const th1 = await sha256(cat(utf8(v.client_hello), utf8(canonical(vmHello))));
  check("th1", hex(th1), v.th1);
  check("th2", hex(await sha256(cat(th1, utf8(v.vm_hello)))), v.th2);
  const okm = await hkdfSha256(shared, th1, utf8("ticrypt-channel-v1 keys"), 128);
  ["k_u2v", "k_v2u", "c_user", "c_vm"].forEach((name, i) => check(name, hex(okm.slice(32 * i, 32 * i + 32)), v[name]));

  for (const entry of v.records) {
    const [from, to] = entry.direction === "user-to-vm" ? [user, vm] : [vm, user];
    const record = await from.seal(unhex(entry.plaintext));
    check(`record ${entry.direction} ${entry.seq}`, hex(record), entry.record);
    const got = await to.receive(unhex(entry.record).buffer);
    check(`plaintext ${entry.direction} ${entry.seq}`, got.plaintexts.map(hex).join(), entry.plaintext);
  }
  return { mismatches: bad, records: v.records.length };
}

/** Each negative vector: {name, got} with got the error code of the last message. */
async function negative() {
  const v = await vectors();
  const results = [];
  for (const entry of v.negative) {
    let got;
    try {
      const channel = await receiver(v, entry.state);
      const messages = entry.messages.map((m) => ("text" in m ? m.text : unhex(m.binary)));
      for (const m of messages.slice(0, -1)) await channel.receive(m);
      got = await outcome(() => channel.receive(messages[messages.length - 1]));
      const after = await outcome(() => channel.receive(messages[messages.length - 1]));
      if (got !== "accepted" && after !== "closed") got += ` (then ${after}, not closed)`;
    } catch (e) {
      got = `set-up failed: ${e}`;
    }
    results.push({ name: entry.name, got });
  }
  return results;
}

/** record-too-large and counter-exhausted, both ends (not in the vector file). */
async function limits() {
  const v = await vectors();
  const out = {};
  // sender: too large is refused without consuming anything
  let user = await receiver(v, "user-established");
  out.sealTooLarge = await outcome(() => user.seal(new Uint8Array(MAX_PLAINTEXT + 1)));
  out.sealMaxAfter = await outcome(() => user.seal(new Uint8Array(MAX_PLAINTEXT)));
  out.sealMaxSeq = hex((await user.seal(new Uint8Array(0))).slice(1, 9));
  // receiver: a record one byte over
  const vm = await receiver(v, "vm-established");
  const big = new Uint8Array(25 + MAX_PLAINTEXT + 1);
  big[0] = 1;
  out.receiveTooLarge = await outcome(() => vm.receive(big));
  out.receiveAfter = await outcome(() => vm.receive(new Uint8Array(25)));
  // counters: two records per direction
  const pair = await (async () => {
    const { user: u, vm: m } = await ends(v, { maxRecords: 2 });
    const hello = await u.start();
    const finish = (await u.receive((await m.receive(hello)).send[0])).send[0];
    await m.receive(finish);
    return { u, m };
  })();
  const records = [];
  for (let i = 0; i < 2; i++) records.push(await pair.u.seal(utf8(`r${i}`)));
  out.sealThird = await outcome(() => pair.u.seal(utf8("r2")));
  out.sealAfterExhausted = await outcome(() => pair.u.seal(utf8("r3")));
  for (const r of records) await pair.m.receive(r);
  out.receiveThird = await outcome(() => pair.m.receive(new Uint8Array(40).fill(1)));
  // misuse
  user = await receiver(v, "user-waiting-hello");
  out.sealEarly = await outcome(() => user.seal(utf8("x")));
  out.startTwice = await outcome(async () => {
    const { user: u } = await ends(v);
    await u.start();
    await u.start();
  });
  // serialized: records fed without awaiting are processed in order
  const ordered = await (async () => {
    const { user: u, vm: m } = await ends(v);
    const finish = (await u.receive((await m.receive(await u.start())).send[0])).send[0];
    await m.receive(finish);
    const sealed = await Promise.all([0, 1, 2, 3, 4].map((i) => u.seal(utf8(`m${i}`))));
    const opened = await Promise.all(sealed.map((r) => m.receive(r)));
    return opened.map((r) => new TextDecoder().decode(r.plaintexts[0])).join(",");
  })();
  out.ordered = ordered;
  return out;
}

/** b64decode of each case: the bytes in hex, or "error". */
function b64cases(cases) {
  return cases.map(([text, length]) => {
    try {
      return hex(b64decode(text, length === null ? undefined : length));
    } catch {
      return "error";
    }
  });
}

/** b64encode of each hex string. */
function b64encodes(hexes) {
  return hexes.map((h) => b64encode(unhex(h)));
}

/** canonical(JSON.parse(text)) of each text, or "error". */
function canonicals(texts) {
  return texts.map((t) => {
    try {
      return canonical(JSON.parse(t));
    } catch (e) {
      return "error";
    }
  });
}

/** parseCanonical of each text: "ok" or the ChannelError code. */
function parses(texts) {
  return texts.map((t) => {
    try {
      parseCanonical(t);
      return "ok";
    } catch (e) {
      return e instanceof ChannelError ? e.code : `not a ChannelError: ${e}`;
    }
  });
}


// -- key files, signatures, key storage (appended: keyfile.js, signed.js, keystore.js)


/** What a test needs to know about an imported key; signs `payload` for `purpose`. */
async function describeKey(key, purpose, payload) {
  let exportRefused;
  try {
    await crypto.subtle.exportKey("pkcs8", key.privateKey);
    exportRefused = false;
  } catch {
    exportRefused = true;
  }
  return {
    publicKey: b64encode(key.publicKey),
    extractable: key.privateKey.extractable,
    algorithm: key.privateKey.algorithm.name,
    usages: key.privateKey.usages,
    exportRefused,
    signature: await signPurpose(key.privateKey, purpose, payload),
  };
}

/** importKeyFile(pem, passphrase): describeKey of it, or {error: code, message}. */
async function keyFile(pem, passphrase, purpose, payload) {
  try {
    return await describeKey(await importKeyFile(pem, passphrase), purpose, payload);
  } catch (e) {
    if (e instanceof KeyFileError) return { error: e.code, message: e.message };
    throw e;
  }
}

/** signingInput in hex (compared with ticrypt.signed.signing_input). */
function signingInputHex(purpose, payload) {
  return hex(signingInput(purpose, payload));
}

/** Import, save to IndexedDB, load back: describeKey of the loaded key. */
async function storeKey(pem, passphrase, user, purpose, payload) {
  const key = await importKeyFile(pem, passphrase);
  await saveKey({ user, ...key });
  const loaded = await loadKey();
  return { user: loaded.user, ...(await describeKey(loaded, purpose, payload)) };
}

/** The stored key after a reload (describeKey plus user), or null. */
async function storedKey(purpose, payload) {
  const loaded = await loadKey();
  return loaded && { user: loaded.user, ...(await describeKey(loaded, purpose, payload)) };
}

/** Forget the stored key; what loadKey gives afterwards. */
async function forget() {
  await forgetKey();
  return loadKey();
}

// -- session.js against test_web_channel.FakeVmc (Python's VM end)

const text = (chunks) => new TextDecoder().decode(cat(...chunks));

/** What a rejected promise carried: {kind, code, closeCode, message}. */
async function failure(promise) {
  try {
    return { kind: "resolved", value: await promise };
  } catch (e) {
    const kind = e instanceof SessionError ? "SessionError" : e instanceof RequestError ? "RequestError" : String(e);
    return { kind, code: e.code, closeCode: e.closeCode ?? null, message: e.message };
  }
}

function options({ token, ticket, vmId, vmKeyHex }, key, progress) {
  return { pageToken: token, ticket, vmId, vmKey: unhex(vmKeyHex), key, onProgress: (s) => progress.push(s), timeout: 20000 };
}

/** The whole of §5 against FakeVmc; a report for the Python side. */
async function sessionFlow(cfg) {
  const key = await ed25519FromSeed(unhex(cfg.userSeedHex));
  const progress = [];
  const s = await openVmSession(options(cfg, key, progress));
  const out = { progress: progress.slice() };
  out.info = await s.info();
  const so = [];
  const se = [];
  out.echoStatus = await s.exec(["echo", "hi", "there"], { onStdout: (b) => so.push(b), onStderr: (b) => se.push(b) }).done;
  out.echo = [text(so), text(se)];
  const co = [];
  const catCmd = s.exec(["cat"], { onStdout: (b) => co.push(b), stdin: "hello world, in pieces" });
  out.catPendingAtOnce = catCmd.pending;
  out.catStatus = await catCmd.done;
  out.cat = text(co);
  out.catSent = catCmd.sent;
  out.nope = await failure(s.exec(["nope"]).done);
  const sh = [];
  const shell = s.shell({ rows: 30, cols: 100 }, { onOutput: (b) => sh.push(b) });
  shell.write("0123456789abcdefghij");
  shell.resize(40, 120);
  shell.eof();
  out.shellStatus = await shell.done;
  out.shell = text(sh);
  const cancelled = s.exec(["sleep"]);
  cancelled.cancel();
  out.cancelStatus = await cancelled.done;
  const closes = [];
  s.onClose((info) => closes.push(info));
  out.revoked = await failure(s.request("close", { code: 4401, reason: "not-authorized: access revoked\n\u001b[2J" }));
  out.closes = closes;
  out.isOpen = s.isOpen;
  out.after = await failure(s.info());
  return out;
}

/** openVmSession's failure with `cfg` (a bad token, no VM, another VM key...). */
async function sessionFailure(cfg) {
  const key = await ed25519FromSeed(unhex(cfg.userSeedHex));
  const progress = [];
  const result = await failure(openVmSession(options(cfg, key, progress)));
  return { ...result, progress };
}

/** Our own close(): 1000 bye, byUs. */
async function sessionClose(cfg) {
  const key = await ed25519FromSeed(unhex(cfg.userSeedHex));
  const s = await openVmSession(options(cfg, key, []));
  const closes = [];
  s.onClose((info) => closes.push(info));
  await s.close();
  const late = [];
  s.onClose((info) => late.push(info));
  await new Promise((r) => setTimeout(r, 0));
  return { closes, late, after: await failure(s.info()) };
}

/** describeClose of each [code, reason]. */
function describeCloses(cases) {
  return cases.map(([code, reason]) => describeClose(code, reason));
}

/** The page's channel error table, and the message of a ChannelError of each code. */
function channelMessages() {
  const codes = Object.keys(CHANNEL_MESSAGES);
  return { table: { ...CHANNEL_MESSAGES }, errors: codes.map((code) => new ChannelError(code).message) };
}

/** What three listeners hear over three fire()s: b adds c and removes a in round 1; c goes after round 2. */
function listenerRounds() {
  const listeners = new Listeners();
  const heard = [];
  let stopC = null;
  const stopA = listeners.add((n) => heard.push(`a${n}`));
  listeners.add((n) => {
    heard.push(`b${n}`);
    stopC ??= listeners.add((m) => heard.push(`c${m}`));
    stopA();
  });
  listeners.fire(1);
  listeners.fire(2);
  stopC();
  listeners.fire(3);
  return heard;
}

window.ticryptTests = {
  channelMessages, positive, negative, limits, b64cases, b64encodes, canonicals, parses,
  keyFile, signingInputHex, storeKey, storedKey, forget,
  sessionFlow, sessionFailure, sessionClose, describeCloses, listenerRounds,
};
document.getElementById("status").textContent = "ready";
