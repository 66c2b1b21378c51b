// Package otpclient is a client for otp.v1.OtpService: send a one-time code to a phone number,
// then verify the code the user typed, and see what became of it. Every call carries the caller
// token and a deadline, and a failed call returns an *Error that says what went wrong in a way a
// program can act on.
//
// SendOtp is retried on UNAVAILABLE (at most SendAttempts tries, within its deadline) with one
// idempotency key, so a retry never sends a second code. VerifyOtp is never retried: a repeated
// VerifyOtp may count a second attempt.
package otpclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	otpv1 "otp-service/clients/go/otp/v1"
)

// DefaultTimeout is the deadline of a call whose context has none.
const DefaultTimeout = 10 * time.Second

// SendAttempts is how many times SendOtp is tried at most while it answers UNAVAILABLE.
const SendAttempts = 3

const (
	// retryBackoff is the wait before a retry when the service gives none (doubling).
	retryBackoff = 500 * time.Millisecond
	// minTry is the least time a retry must have left to be worth making.
	minTry = time.Second
)

// Client calls one otp-service target with one caller token. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	stub    otpv1.OtpServiceClient
	token   string
	timeout time.Duration
}

type options struct {
	tls     *tls.Config
	timeout time.Duration
}

// Option configures New.
type Option func(*options)

// WithTLS speaks TLS to the server with config (mutual TLS when it has a client certificate);
// without it the connection is plaintext.
func WithTLS(config *tls.Config) Option {
	return func(o *options) { o.tls = config }
}

// WithTimeout sets the deadline of calls whose context has none (DefaultTimeout otherwise).
func WithTimeout(timeout time.Duration) Option {
	return func(o *options) { o.timeout = timeout }
}

// New connects to target ("host:port") as the caller whose token is token.
func New(target, token string, opts ...Option) (*Client, error) {
	if token == "" {
		return nil, &Error{Kind: KindInvalidInput, Message: "token: a caller token is required"}
	}
	o := options{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	transport := grpc.WithInsecure()
	if o.tls != nil {
		transport = grpc.WithTransportCredentials(credentials.NewTLS(o.tls))
	}
	conn, err := grpc.Dial(target, transport)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: otpv1.NewOtpServiceClient(conn), token: token, timeout: o.timeout}, nil
}

// SendResult is a code that was sent: until when it is valid and when the next send is allowed.
type SendResult struct {
	ExpiresAt   time.Time
	ResendAfter time.Duration
	Channel     otpv1.Channel
	MessageID   string
}

// VerifyResult is the outcome of checking a code; AttemptsRemaining is set with WRONG_CODE.
type VerifyResult struct {
	Verified          bool
	Outcome           otpv1.VerifyOutcome
	AttemptsRemaining int
}

// SendOption configures one SendOtp call.
type SendOption func(*otpv1.SendOtpRequest)

// WithIdempotencyKey names the logical send (a new key is made without it): give the same key to
// call again after an answer was lost, and the service answers what it answered, sending nothing.
func WithIdempotencyKey(key string) SendOption {
	return func(r *otpv1.SendOtpRequest) { r.IdempotencyKey = key }
}

// WithLocale gives the user's language as a BCP 47 tag (e.g. "hi-IN"), for the template's language.
func WithLocale(locale string) SendOption {
	return func(r *otpv1.SendOtpRequest) { r.Locale = locale }
}

// SendOtp sends a new code to phoneNumber (E.164, e.g. "+917003848501"); retried on UNAVAILABLE
// with one idempotency key.
func (c *Client) SendOtp(ctx context.Context, phoneNumber string, opts ...SendOption) (*SendResult, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	request := &otpv1.SendOtpRequest{PhoneNumber: phoneNumber}
	for _, opt := range opts {
		opt(request)
	}
	if request.IdempotencyKey == "" {
		key, err := newKey()
		if err != nil {
			return nil, err
		}
		request.IdempotencyKey = key
	}
	for attempt := 0; ; attempt++ {
		answer, err := c.stub.SendOtp(ctx, request)
		if err == nil {
			return &SendResult{
				ExpiresAt:   answer.GetExpiresAt().AsTime(),
				ResendAfter: time.Duration(answer.GetResendAfterSeconds()) * time.Second,
				Channel:     answer.GetChannel(),
				MessageID:   answer.GetMessageId(),
			}, nil
		}
		err = errorFrom(err)
		wait, again := retryWait(ctx, err, attempt)
		if !again {
			return nil, err
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, err
		}
	}
}

// OtpStatus is what became of a number's latest code (GetOtpStatus); never the code itself.
// Channel is unset and MessageID empty until the provider accepted the message; FailureReason and
// Failure are set with DELIVERY_STATE_FAILED; ResendAfter is 0 when a new code may be sent now;
// Language is WhatsApp's code of the template's language ("" for a text message).
//
// Failure is for a program to act on: DELIVERY_FAILURE_NOT_ON_WHATSAPP, reach the user another
// way; _TEMPLATE_UNAVAILABLE, the service's operators must fix it; _RATE_LIMITED, wait or use
// another channel; _EXPIRED, send a new code.
type OtpStatus struct {
	State         otpv1.DeliveryState
	Channel       otpv1.Channel
	MessageID     string
	FailureReason string
	Failure       otpv1.DeliveryFailure
	Language      string
	Verified      bool
	ExpiresAt     time.Time
	ResendAfter   time.Duration
}

// GetOtpStatus says what became of the number's latest code; ErrNotFound when it has no live code.
func (c *Client) GetOtpStatus(ctx context.Context, phoneNumber string) (*OtpStatus, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	answer, err := c.stub.GetOtpStatus(ctx, &otpv1.GetOtpStatusRequest{PhoneNumber: phoneNumber})
	if err != nil {
		return nil, errorFrom(err)
	}
	return &OtpStatus{
		State:         answer.GetState(),
		Channel:       answer.GetChannel(),
		MessageID:     answer.GetMessageId(),
		FailureReason: answer.GetFailureReason(),
		Failure:       answer.GetFailure(),
		Language:      answer.GetLanguage(),
		Verified:      answer.GetVerified(),
		ExpiresAt:     answer.GetExpiresAt().AsTime(),
		ResendAfter:   time.Duration(answer.GetResendAfterSeconds()) * time.Second,
	}, nil
}

// VerifyOtp checks the code the user typed; a wrong code is a result, not an error.
func (c *Client) VerifyOtp(ctx context.Context, phoneNumber, otpCode string) (*VerifyResult, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	answer, err := c.stub.VerifyOtp(ctx, &otpv1.VerifyOtpRequest{PhoneNumber: phoneNumber, OtpCode: otpCode})
	if err != nil {
		return nil, errorFrom(err)
	}
	return &VerifyResult{
		Verified:          answer.GetVerified(),
		Outcome:           answer.GetOutcome(),
		AttemptsRemaining: int(answer.GetAttemptsRemaining()),
	}, nil
}

// Close releases the connection.
func (c *Client) Close() error {
	return c.conn.Close()
}

// retryWait is how long to wait before trying SendOtp again after err on try attempt (from 0);
// false when it is not tried again: another error, the last try, or no time left.
func retryWait(ctx context.Context, err error, attempt int) (time.Duration, bool) {
	var e *Error
	// DEADLINE_EXCEEDED is unavailable too, but then the deadline of every try has passed.
	if !errors.As(err, &e) || e.Code != codes.Unavailable || attempt+1 >= SendAttempts {
		return 0, false
	}
	wait := e.RetryAfter
	if wait == 0 {
		wait = retryBackoff << attempt
	}
	deadline, _ := ctx.Deadline()
	return wait, time.Until(deadline)-wait >= minTry
}

// newKey is a random idempotency key, one for each logical send.
func newKey() (string, error) {
	key := make([]byte, 16)
	if _, err := rand.Read(key); err != nil {
		return "", err
	}
	return hex.EncodeToString(key), nil
}

// call is ctx with the caller token and, unless ctx has one, the default deadline.
func (c *Client) call(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}
