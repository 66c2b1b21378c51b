/**
 * A client for otp.v1.OtpService on @grpc/grpc-js: send a one-time code to a phone number and
 * verify what the user typed, with the caller token on every call, a deadline on every call, and
 * errors a program can act on (the status' google.rpc details, decoded).
 *
 *     const client = new OtpClient("otp-service:50051", token);
 *     await client.sendOtp("+917003848501");
 *     const result = await client.verifyOtp("+917003848501", typedCode);
 *
 * No call is retried: a repeated VerifyOtp may count a second attempt, and a repeated SendOtp
 * sends a second code.
 */
import * as grpc from "@grpc/grpc-js";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";
import { ErrorReason } from "./gen/otp/v1/error_reason";
import {
  Channel,
  OtpServiceClient,
  SendOtpResponse,
  VerifyOtpResponse,
  VerifyOutcome,
} from "./gen/otp/v1/otp";

export { Channel, ErrorReason, VerifyOutcome };

/** Milliseconds each call may take unless the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 10_000;

/** TLS for the channel: the CA to trust (default: the system's), a client certificate and key for mutual TLS. PEM. */
export interface TlsOptions {
  rootCerts?: Buffer;
  certChain?: Buffer;
  privateKey?: Buffer;
}

export interface OtpClientOptions {
  /** TLS; plaintext when absent. */
  tls?: TlsOptions;
  /** The deadline of a call that gives none. */
  timeoutMs?: number;
}

export interface CallOptions {
  timeoutMs?: number;
}

export interface SendResult {
  expiresAt: Date;
  resendAfterSeconds: number;
  channel: Channel;
  messageId: string;
}

export interface VerifyResult {
  verified: boolean;
  outcome: VerifyOutcome;
  /** Wrong tries left; set with WRONG_CODE. */
  attemptsRemaining: number;
}

/**
 * Any failed call. `reason` is the name of an otp.v1.ErrorReason (e.g. "RESEND_COOLDOWN"), or ""
 * when gRPC itself ended the call (a deadline, no connection).
 */
export class OtpError extends Error {
  readonly code: grpc.status;
  readonly reason: string;
  readonly metadata: Record<string, string>;
  /** Milliseconds until the same call may succeed (google.rpc.RetryInfo), when the service says. */
  readonly retryAfterMs: number | undefined;
  readonly fieldViolations: { field: string; description: string }[];

  constructor(code: grpc.status, message: string, details: Details = NO_DETAILS) {
    super(`${details.reason || grpc.status[code]}: ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.reason = details.reason;
    this.metadata = details.metadata;
    this.retryAfterMs = details.retryAfterMs;
    this.fieldViolations = details.fieldViolations;
  }
}

/** INVALID_ARGUMENT: `field` names the malformed field, `problem` says what is wrong. */
export class InvalidInput extends OtpError {
  get field(): string {
    return this.fieldViolations[0]?.field ?? this.metadata.field ?? "";
  }
  get problem(): string {
    return this.fieldViolations[0]?.description ?? this.message;
  }
}
/** UNAUTHENTICATED: the call carried no valid caller token. */
export class Unauthenticated extends OtpError {}
/** PERMISSION_DENIED: policy forbids it, e.g. a number whose country is not served. */
export class NotAllowed extends OtpError {}
/** RESOURCE_EXHAUSTED with a retry delay: wait `retryAfterMs`; `reason` says which limit. */
export class RateLimited extends OtpError {
  declare readonly retryAfterMs: number;
}
/** FAILED_PRECONDITION: the message provider refused the message; `reason` is the cause. */
export class DeliveryRefused extends OtpError {}
/** UNAVAILABLE or DEADLINE_EXCEEDED: try again later. */
export class Unavailable extends OtpError {}

interface Details {
  reason: string;
  metadata: Record<string, string>;
  retryAfterMs: number | undefined;
  fieldViolations: { field: string; description: string }[];
}

const NO_DETAILS: Details = { reason: "", metadata: {}, retryAfterMs: undefined, fieldViolations: [] };

const BY_CODE: Partial<Record<grpc.status, typeof OtpError>> = {
  [grpc.status.INVALID_ARGUMENT]: InvalidInput,
  [grpc.status.UNAUTHENTICATED]: Unauthenticated,
  [grpc.status.PERMISSION_DENIED]: NotAllowed,
  [grpc.status.FAILED_PRECONDITION]: DeliveryRefused,
  [grpc.status.UNAVAILABLE]: Unavailable,
  [grpc.status.DEADLINE_EXCEEDED]: Unavailable,
};

/** The typed error for a failed call. */
export function errorFrom(error: grpc.ServiceError): OtpError {
  const details = decodeDetails(error.metadata);
  let kind = BY_CODE[error.code] ?? OtpError;
  // gRPC itself answers RESOURCE_EXHAUSTED for an oversize request: that is no rate limit.
  if (error.code === grpc.status.RESOURCE_EXHAUSTED && details.retryAfterMs !== undefined) {
    kind = RateLimited;
  }
  return new kind(error.code, error.details, details);
}

function decodeDetails(metadata: grpc.Metadata | undefined): Details {
  const [raw] = metadata?.get("grpc-status-details-bin") ?? [];
  if (!(raw instanceof Buffer)) {
    return NO_DETAILS;
  }
  const details: Details = { ...NO_DETAILS, fieldViolations: [] };
  for (const any of Status.decode(raw).details) {
    const type = any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1);
    if (type === "google.rpc.ErrorInfo") {
      const info = ErrorInfo.decode(any.value);
      details.reason = info.reason;
      details.metadata = info.metadata;
    } else if (type === "google.rpc.RetryInfo") {
      const delay = RetryInfo.decode(any.value).retryDelay;
      details.retryAfterMs = (delay?.seconds ?? 0) * 1000 + (delay?.nanos ?? 0) / 1e6;
    } else if (type === "google.rpc.BadRequest") {
      details.fieldViolations.push(...BadRequest.decode(any.value).fieldViolations);
    }
  }
  return details;
}

export class OtpClient {
  private readonly client: OtpServiceClient;
  private readonly metadata: grpc.Metadata;
  private readonly timeoutMs: number;

  /** `target` is "host:port"; `token` the calling service's token. */
  constructor(target: string, token: string, options: OtpClientOptions = {}) {
    if (!token) {
      throw new TypeError("token: a caller token is required");
    }
    const tls = options.tls;
    const credentials = tls
      ? grpc.credentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null)
      : grpc.credentials.createInsecure();
    this.client = new OtpServiceClient(target, credentials);
    this.metadata = new grpc.Metadata();
    this.metadata.set("authorization", `Bearer ${token}`);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  /** Send a new code to `phoneNumber` (E.164, e.g. "+917003848501"). */
  async sendOtp(phoneNumber: string, options: CallOptions = {}): Promise<SendResult> {
    const response = await new Promise<SendOtpResponse>((resolve, reject) =>
      this.client.sendOtp({ phoneNumber }, this.metadata, this.callOptions(options), (error, answer) =>
        error ? reject(errorFrom(error)) : resolve(answer),
      ),
    );
    return {
      expiresAt: response.expiresAt ?? new Date(0),
      resendAfterSeconds: response.resendAfterSeconds,
      channel: response.channel,
      messageId: response.messageId,
    };
  }

  /** Check the code the user typed; a wrong code is a result, not an error. */
  async verifyOtp(phoneNumber: string, otpCode: string, options: CallOptions = {}): Promise<VerifyResult> {
    const response = await new Promise<VerifyOtpResponse>((resolve, reject) =>
      this.client.verifyOtp({ phoneNumber, otpCode }, this.metadata, this.callOptions(options), (error, answer) =>
        error ? reject(errorFrom(error)) : resolve(answer),
      ),
    );
    return {
      verified: response.verified,
      outcome: response.outcome,
      attemptsRemaining: response.attemptsRemaining,
    };
  }

  close(): void {
    this.client.close();
  }

  private callOptions(options: CallOptions): Partial<grpc.CallOptions> {
    return { deadline: Date.now() + (options.timeoutMs ?? this.timeoutMs) };
  }
}
