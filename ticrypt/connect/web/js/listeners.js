// A set of listener callbacks, for the page's "tell me when ..." functions
// (onPageLost, onSessionLost, VmConn.listen).

/**
 * Callbacks added with add() and called, in the order added, by fire().
 * fire() calls the callbacks there were when it began: one added or removed
 * by a callback takes effect from the next fire().
 */
export class Listeners {
  #callbacks = new Set();

  /** Add `cb`; the function that removes it. */
  add(cb) {
    this.#callbacks.add(cb);
    return () => this.#callbacks.delete(cb);
  }

  /** cb(...args) for each callback. */
  fire(...args) {
    for (const cb of [...this.#callbacks]) cb(...args);
  }
}
