// sendOtp's retries, against an OtpService of this test's own on a real port: it answers
// UNAVAILABLE as told, then a code, and remembers every request it got.
import assert from "node:assert/strict";
import { test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { RetryInfo } from "../src/gen/google/rpc/error_details";
import { Status } from "../src/gen/google/rpc/status";
import { Channel, OtpServiceServer, OtpServiceService, SendOtpRequest } from "../src/gen/otp/v1/otp";
import { OtpClient, SEND_ATTEMPTS, Unavailable } from "../src";

function unavailable(retryAfterMs: number): grpc.ServiceError {
  const retry = RetryInfo.encode({ retryDelay: { seconds: Math.floor(retryAfterMs / 1000), nanos: (retryAfterMs % 1000) * 1e6 } }).finish();
  const details = Status.encode({
    code: grpc.status.UNAVAILABLE,
    message: "try again",
    details: [{ typeUrl: "type.googleapis.com/google.rpc.RetryInfo", value: Buffer.from(retry) }],
  }).finish();
  const metadata = new grpc.Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(details));
  return Object.assign(new Error("try again"), { code: grpc.status.UNAVAILABLE, details: "try again", metadata });
}

async function flaky(failures: grpc.ServiceError[]): Promise<{ client: OtpClient; requests: SendOtpRequest[]; stop: () => void }> {
  const requests: SendOtpRequest[] = [];
  const implementation: Partial<OtpServiceServer> = {
    sendOtp: (call, callback) => {
      requests.push(call.request);
      const failure = failures.shift();
      if (failure) {
        callback(failure);
      } else {
        callback(null, { expiresAt: new Date(), resendAfterSeconds: 30, channel: Channel.CHANNEL_TEXT, messageId: "msg-1" });
      }
    },
  };
  const server = new grpc.Server();
  server.addService(OtpServiceService, implementation as OtpServiceServer);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound))),
  );
  const client = new OtpClient(`127.0.0.1:${port}`, "token");
  return { client, requests, stop: () => (client.close(), server.forceShutdown()) };
}

test("sendOtp is retried on UNAVAILABLE with one key for every try", async () => {
  const { client, requests, stop } = await flaky([unavailable(10), unavailable(10)]);
  try {
    assert.equal((await client.sendOtp("+917003848501")).messageId, "msg-1");
    assert.equal(requests.length, SEND_ATTEMPTS);
    const key = requests[0].idempotencyKey;
    assert.ok(key);
    assert.deepEqual(new Set(requests.map((request) => request.idempotencyKey)), new Set([key]));
  } finally {
    stop();
  }
});

test("sendOtp is not retried past its tries nor its deadline", async () => {
  const many = await flaky([1, 2, 3, 4, 5].map(() => unavailable(10)));
  try {
    await assert.rejects(many.client.sendOtp("+917003848501", { idempotencyKey: "mine" }), Unavailable);
    assert.equal(many.requests.length, SEND_ATTEMPTS);
    assert.equal(many.requests[0].idempotencyKey, "mine");
  } finally {
    many.stop();
  }
  // A wait longer than the deadline leaves: the error at once, not a retry.
  const long = await flaky([unavailable(60_000)]);
  try {
    await assert.rejects(long.client.sendOtp("+917003848501"), Unavailable);
    assert.equal(long.requests.length, 1);
  } finally {
    long.stop();
  }
});
