// The user's key in the browser's storage: IndexedDB database "ticrypt",
// object store "keys", one record.  The private key is stored as the
// non-extractable CryptoKey itself (structured clone): its bytes never
// reach JavaScript, only sign() can use it.

const DB = "ticrypt";
const STORE = "keys";
const SLOT = "default";

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function open() {
  const req = indexedDB.open(DB, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(STORE);
  return request(req);
}

/** Run `fn(store)` in one transaction; resolves with fn's request result once committed. */
async function withStore(mode, fn) {
  const db = await open();
  try {
    const tx = db.transaction(STORE, mode);
    const result = request(fn(tx.objectStore(STORE)));
    result.catch(() => {}); // reported through the transaction below
    await new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
    });
    return await result;
  } finally {
    db.close();
  }
}

/**
 * Keep the user's key (replacing any earlier one).
 * @param {{user: string, privateKey: CryptoKey, publicKey: Uint8Array}} key
 * @returns {Promise<void>}
 */
export async function saveKey({ user, privateKey, publicKey }) {
  if (!(privateKey instanceof CryptoKey) || privateKey.extractable) {
    throw new TypeError("only a non-extractable CryptoKey is stored");
  }
  await withStore("readwrite", (s) => s.put({ user, privateKey, publicKey: Uint8Array.from(publicKey) }, SLOT));
}

/**
 * The stored key, or null.
 * @returns {Promise<{user: string, privateKey: CryptoKey, publicKey: Uint8Array} | null>}
 */
export async function loadKey() {
  const rec = await withStore("readonly", (s) => s.get(SLOT));
  if (!rec || !(rec.privateKey instanceof CryptoKey) || !(rec.publicKey instanceof Uint8Array)) return null;
  return { user: rec.user, privateKey: rec.privateKey, publicKey: rec.publicKey };
}

/**
 * Remove the stored key ("forget this key").
 * @returns {Promise<void>}
 */
export async function forgetKey() {
  await withStore("readwrite", (s) => s.delete(SLOT));
}
