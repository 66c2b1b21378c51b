// Package otpclient is a client for otp.v1.OtpService: send a one-time code to a phone number,
// then verify the code the user typed. Every call carries the caller token and a deadline, and a
// failed call returns an *Error that says what went wrong in a way a program can act on.
//
// No call is retried: a repeated VerifyOtp may count a second attempt, and a repeated SendOtp
// sends a second code.
package otpclient

import (
	"context"
	"crypto/tls"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	otpv1 "otp-service/clients/go/otp/v1"
)

// DefaultTimeout is the deadline of a call whose context has none.
const DefaultTimeout = 10 * time.Second

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

// SendOtp sends a new code to phoneNumber (E.164, e.g. "+917003848501").
func (c *Client) SendOtp(ctx context.Context, phoneNumber string) (*SendResult, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	answer, err := c.stub.SendOtp(ctx, &otpv1.SendOtpRequest{PhoneNumber: phoneNumber})
	if err != nil {
		return nil, errorFrom(err)
	}
	return &SendResult{
		ExpiresAt:   answer.GetExpiresAt().AsTime(),
		ResendAfter: time.Duration(answer.GetResendAfterSeconds()) * time.Second,
		Channel:     answer.GetChannel(),
		MessageID:   answer.GetMessageId(),
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

// call is ctx with the caller token and, unless ctx has one, the default deadline.
func (c *Client) call(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}
