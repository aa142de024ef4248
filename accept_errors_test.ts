import assert from "node:assert/strict";
import { acceptErrorKind } from "./accept_errors.ts";

Deno.test("acceptErrorKind() sorts by code or os error number, not class", () => {
  const withCode = (code: string, message = code) =>
    Object.assign(new Error(message), { code });
  for (const code of ["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"]) {
    assert.equal(acceptErrorKind(withCode(code)), "exhaustion", code);
  }
  for (const errno of [12, 23, 24, 105]) {
    const error = new Error(`no room (os error ${errno})`);
    assert.equal(acceptErrorKind(error), "exhaustion", String(errno));
  }
  // The code wins over the class.
  const reset = Object.assign(new Deno.errors.ConnectionReset("x"), {
    code: "EMFILE",
  });
  assert.equal(acceptErrorKind(reset), "exhaustion");
  for (
    const code of [
      "ENOTCONN",
      "ECONNRESET",
      "ECONNABORTED",
      "EPERM",
      "ETIMEDOUT",
      "EPROTO",
      "ENETUNREACH",
      "EHOSTUNREACH",
    ]
  ) {
    assert.equal(acceptErrorKind(withCode(code)), "client", code);
  }
  assert.equal(acceptErrorKind(new Deno.errors.NotConnected("x")), "client");
  assert.equal(acceptErrorKind(new Deno.errors.ConnectionReset("x")), "client");
  assert.equal(
    acceptErrorKind(new Deno.errors.ConnectionAborted("x")),
    "client",
  );
  assert.equal(acceptErrorKind(withCode("EBADF")), "unknown");
  assert.equal(acceptErrorKind(new Error("(os error 9)")), "unknown");
  assert.equal(acceptErrorKind(new Deno.errors.BadResource("x")), "unknown");
  assert.equal(acceptErrorKind("not an error"), "unknown");
});
