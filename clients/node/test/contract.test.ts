// The contract scenario every client runs against a live server (`make test-clients`).
// OTP_TARGET and OTP_TOKEN name the server and a caller token; OTP_TEST_NUMBER is one of the
// server's OTP_TEST_NUMBERS and OTP_TEST_CODE its code.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import {
  Channel,
  DeliveryFailure,
  DeliveryState,
  OtpClient,
  RateLimited,
  Unauthenticated,
  VerifyOutcome,
} from "../src";

const { OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER, OTP_TEST_CODE, OTP_UNREACHABLE_NUMBER } = process.env;
const configured = OTP_TARGET && OTP_TOKEN && OTP_TEST_NUMBER && OTP_TEST_CODE;

test("contract", { skip: configured ? false : "needs OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER, OTP_TEST_CODE" }, async () => {
  const [target, token, number, code] = [OTP_TARGET!, OTP_TOKEN!, OTP_TEST_NUMBER!, OTP_TEST_CODE!];
  const wrong = [...code].map((digit) => String((Number(digit) + 1) % 10)).join("");
  const client = new OtpClient(target, token);
  try {
    const idempotencyKey = randomUUID();
    const sent = await client.sendOtp(number, { idempotencyKey });
    assert.equal(sent.channel, Channel.CHANNEL_TEST);
    // A retry with the same key answers the same, sending nothing.
    assert.deepEqual(await client.sendOtp(number, { idempotencyKey }), sent);

    const status = await client.getOtpStatus(number);
    assert.equal(status.state, DeliveryState.DELIVERY_STATE_QUEUED);
    assert.equal(status.channel, Channel.CHANNEL_TEST);
    assert.equal(status.verified, false);
    assert.deepEqual(status.expiresAt, sent.expiresAt);

    const result = await client.verifyOtp(number, wrong);
    assert.equal(result.outcome, VerifyOutcome.VERIFY_OUTCOME_WRONG_CODE);
    assert.ok(result.attemptsRemaining > 0);
    assert.equal((await client.verifyOtp(number, code)).verified, true);
    assert.equal((await client.getOtpStatus(number)).verified, true);

    await assert.rejects(client.sendOtp(number), (error: unknown) => {
      assert.ok(error instanceof RateLimited, String(error));
      assert.equal(error.reason, "RESEND_COOLDOWN");
      assert.ok(error.retryAfterMs >= 1000);
      return true;
    });

    // A number not on WhatsApp (when the server's Interakt reports one): the failure is typed.
    if (OTP_UNREACHABLE_NUMBER) {
      await client.sendOtp(OTP_UNREACHABLE_NUMBER);
      let failed = await client.getOtpStatus(OTP_UNREACHABLE_NUMBER);
      for (let waited = 0; failed.state !== DeliveryState.DELIVERY_STATE_FAILED && waited < 15_000; waited += 100) {
        await sleep(100);
        failed = await client.getOtpStatus(OTP_UNREACHABLE_NUMBER);
      }
      assert.equal(failed.state, DeliveryState.DELIVERY_STATE_FAILED);
      assert.equal(failed.failure, DeliveryFailure.DELIVERY_FAILURE_NOT_ON_WHATSAPP);
      assert.ok(failed.failureReason);
    }
  } finally {
    client.close();
  }

  const stranger = new OtpClient(target, `not-${token}`);
  try {
    await assert.rejects(stranger.sendOtp(number), (error: unknown) => {
      assert.ok(error instanceof Unauthenticated, String(error));
      assert.equal(error.reason, "CALLER_NOT_AUTHENTICATED");
      return true;
    });
  } finally {
    stranger.close();
  }
});
