// Error decoding against a live server (the same variables as the contract test). None of these
// calls sends a code, so they do not touch the test number's cooldown.
import assert from "node:assert/strict";
import { test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { InvalidInput, OtpClient, Unavailable } from "../src";

const { OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER } = process.env;
const skip = OTP_TARGET && OTP_TOKEN && OTP_TEST_NUMBER ? false : "needs OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER";

test("a malformed code is InvalidInput naming the field", { skip }, async () => {
  const client = new OtpClient(OTP_TARGET!, OTP_TOKEN!);
  try {
    await assert.rejects(client.verifyOtp(OTP_TEST_NUMBER!, "12a"), (error: unknown) => {
      assert.ok(error instanceof InvalidInput, String(error));
      assert.equal(error.reason, "INVALID_CODE");
      assert.equal(error.field, "otp_code");
      assert.equal(error.problem, "must contain only the digits 0-9");
      return true;
    });
  } finally {
    client.close();
  }
});

test("a call past its deadline is Unavailable without a reason", { skip }, async () => {
  const client = new OtpClient(OTP_TARGET!, OTP_TOKEN!, { timeoutMs: 0 });
  try {
    await assert.rejects(client.verifyOtp(OTP_TEST_NUMBER!, "123456"), (error: unknown) => {
      assert.ok(error instanceof Unavailable, String(error));
      assert.equal(error.code, grpc.status.DEADLINE_EXCEEDED);
      assert.equal(error.reason, "");
      return true;
    });
  } finally {
    client.close();
  }
});
