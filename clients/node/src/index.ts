/**
 * A client for otp.v1.OtpService on @grpc/grpc-js: send a one-time code to a phone number,
 * verify what the user typed and see what became of the code, with the caller token on every
 * call, a deadline on every call, and errors a program can act on (the status' google.rpc
 * details, decoded).
 *
 *     const client = new OtpClient("otp-service:50051", token);
 *     await client.sendOtp("+917003848501");
 *     const result = await client.verifyOtp("+917003848501", typedCode);
 *
 * sendOtp is retried on UNAVAILABLE (at most SEND_ATTEMPTS tries, within its deadline) with one
 * idempotency key, so a retry never sends a second code. verifyOtp is never retried: a repeated
 * VerifyOtp may count a second attempt.
 */
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import * as grpc from "@grpc/grpc-js";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";
import { ErrorReason } from "./gen/otp/v1/error_reason";
import {
  Channel,
  DeliveryFailure,
  DeliveryState,
  GetOtpStatusResponse,
  OtpServiceClient,
  SendOtpResponse,
  VerifyOtpResponse,
  VerifyOutcome,
} from "./gen/otp/v1/otp";

export { Channel, DeliveryFailure, DeliveryState, ErrorReason, VerifyOutcome };

/** Milliseconds each call may take unless the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 10_000;
/** SendOtp is tried this many times at most while it answers UNAVAILABLE, within its deadline. */
export const SEND_ATTEMPTS = 3;
/** The wait before a retry when the service gives none (doubling). */
const RETRY_BACKOFF_MS = 500;
/** The least time a retry must have left to be worth making. */
const MIN_TRY_MS = 1_000;

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

export interface SendOptions extends CallOptions {
  /**
   * Names the logical send (a new one is made when absent): give the same key to call again after
   * an answer was lost, and the service answers what it answered, sending nothing.
   */
  idempotencyKey?: string;
  /** The user's language as a BCP 47 tag (e.g. "hi-IN"), for the template's language. */
  locale?: string;
}

export interface SendResult {
  expiresAt: Date;
  resendAfterSeconds: number;
  channel: Channel;
  messageId: string;
}

/** What became of a number's latest code (GetOtpStatus); never the code itself. */
export interface OtpStatus {
  state: DeliveryState;
  /** CHANNEL_UNSPECIFIED until the provider accepted the message. */
  channel: Channel;
  /** Empty until the provider accepted the message (and for test numbers). */
  messageId: string;
  /** Set with DELIVERY_STATE_FAILED when the provider said why. */
  failureReason: string;
  verified: boolean;
  expiresAt: Date;
  /** 0: a new code may be sent now. */
  resendAfterSeconds: number;
  /**
   * Why WhatsApp did not deliver it, set with DELIVERY_STATE_FAILED: NOT_ON_WHATSAPP, reach the user
   * another way; TEMPLATE_UNAVAILABLE, the service's operators must fix it; RATE_LIMITED, wait or use
   * another channel; EXPIRED, send a new code.
   */
  failure: DeliveryFailure;
  /** WhatsApp's code of the template's language ("" for a text message). */
  language: string;
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
/** NOT_FOUND: getOtpStatus found no live code for the number. */
export class NotFound extends OtpError {}
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
  [grpc.status.NOT_FOUND]: NotFound,
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

/**
 * Milliseconds to wait before trying SendOtp again after `error` on try `attempt` (from 0);
 * undefined when it is not tried again: another error, the last try, or no time left.
 */
function retryWait(error: unknown, attempt: number, timeLeftMs: number): number | undefined {
  // DEADLINE_EXCEEDED is Unavailable too, but then the deadline of every try has passed.
  if (!(error instanceof Unavailable) || error.code !== grpc.status.UNAVAILABLE || attempt + 1 >= SEND_ATTEMPTS) {
    return undefined;
  }
  const wait = error.retryAfterMs ?? RETRY_BACKOFF_MS * 2 ** attempt;
  return timeLeftMs - wait >= MIN_TRY_MS ? wait : undefined;
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

  /** Send a new code to `phoneNumber` (E.164, e.g. "+917003848501"); retried on UNAVAILABLE. */
  async sendOtp(phoneNumber: string, options: SendOptions = {}): Promise<SendResult> {
    const request = {
      phoneNumber,
      idempotencyKey: options.idempotencyKey || randomUUID(),
      locale: options.locale ?? "",
    };
    const deadline = Date.now() + (options.timeoutMs ?? this.timeoutMs);
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await new Promise<SendOtpResponse>((resolve, reject) =>
          this.client.sendOtp(request, this.metadata, { deadline }, (error, answer) =>
            error ? reject(errorFrom(error)) : resolve(answer),
          ),
        );
        return {
          expiresAt: response.expiresAt ?? new Date(0),
          resendAfterSeconds: response.resendAfterSeconds,
          channel: response.channel,
          messageId: response.messageId,
        };
      } catch (error) {
        const wait = retryWait(error, attempt, deadline - Date.now());
        if (wait === undefined) {
          throw error;
        }
        await sleep(wait);
      }
    }
  }

  /** What became of the number's latest code; NotFound when it has no live code. */
  async getOtpStatus(phoneNumber: string, options: CallOptions = {}): Promise<OtpStatus> {
    const response = await new Promise<GetOtpStatusResponse>((resolve, reject) =>
      this.client.getOtpStatus({ phoneNumber }, this.metadata, this.callOptions(options), (error, answer) =>
        error ? reject(errorFrom(error)) : resolve(answer),
      ),
    );
    return {
      state: response.state,
      channel: response.channel,
      messageId: response.messageId,
      failureReason: response.failureReason,
      verified: response.verified,
      expiresAt: response.expiresAt ?? new Date(0),
      resendAfterSeconds: response.resendAfterSeconds,
      failure: response.failure,
      language: response.language,
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
