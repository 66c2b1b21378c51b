package otpclient

import (
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Kind tells failed calls apart by what a caller does about them.
type Kind int

const (
	// KindOther is any failure not below (e.g. INTERNAL).
	KindOther Kind = iota
	// KindInvalidInput is INVALID_ARGUMENT: Field names the malformed field.
	KindInvalidInput
	// KindUnauthenticated is UNAUTHENTICATED: no valid caller token.
	KindUnauthenticated
	// KindNotAllowed is PERMISSION_DENIED: e.g. a number whose country is not served.
	KindNotAllowed
	// KindRateLimited is RESOURCE_EXHAUSTED with a retry delay: wait RetryAfter.
	KindRateLimited
	// KindDeliveryRefused is FAILED_PRECONDITION: Interakt refused the message; Reason is why.
	KindDeliveryRefused
	// KindUnavailable is UNAVAILABLE or DEADLINE_EXCEEDED: try again later.
	KindUnavailable
	// KindNotFound is NOT_FOUND: GetOtpStatus found no live code for the number.
	KindNotFound
)

var kindNames = [...]string{"other", "invalid input", "unauthenticated", "not allowed", "rate limited", "delivery refused", "unavailable", "not found"}

func (k Kind) String() string { return kindNames[k] }

// Error is a failed call. Reason is the name of an otp.v1.ErrorReason (e.g. "RESEND_COOLDOWN"),
// or "" when gRPC itself ended the call (a deadline, no connection).
type Error struct {
	Kind     Kind
	Code     codes.Code
	Message  string
	Reason   string
	Metadata map[string]string
	// RetryAfter is how long to wait before the same call may succeed; 0 when not known.
	RetryAfter time.Duration
	// Field and Problem name the malformed field and what is wrong with it (KindInvalidInput).
	Field, Problem string
}

func (e *Error) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("otp-service: %s: %s", e.Reason, e.Message)
	}
	return fmt.Sprintf("otp-service: %s: %s", e.Code, e.Message)
}

// Is makes errors.Is(err, otpclient.ErrRateLimited) (and the other Err values) match by kind.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == codes.OK && t.Kind == e.Kind
}

// Values to match a kind with errors.Is.
var (
	ErrInvalidInput    = &Error{Kind: KindInvalidInput}
	ErrUnauthenticated = &Error{Kind: KindUnauthenticated}
	ErrNotAllowed      = &Error{Kind: KindNotAllowed}
	ErrRateLimited     = &Error{Kind: KindRateLimited}
	ErrDeliveryRefused = &Error{Kind: KindDeliveryRefused}
	ErrUnavailable     = &Error{Kind: KindUnavailable}
	ErrNotFound        = &Error{Kind: KindNotFound}
)

var kindByCode = map[codes.Code]Kind{
	codes.InvalidArgument:    KindInvalidInput,
	codes.Unauthenticated:    KindUnauthenticated,
	codes.PermissionDenied:   KindNotAllowed,
	codes.FailedPrecondition: KindDeliveryRefused,
	codes.Unavailable:        KindUnavailable,
	codes.DeadlineExceeded:   KindUnavailable,
	codes.NotFound:           KindNotFound,
}

// errorFrom is the *Error for a failed call, with the status' google.rpc details decoded.
func errorFrom(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Kind: kindByCode[st.Code()], Code: st.Code(), Message: st.Message(), Metadata: map[string]string{}}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason, e.Metadata = d.GetReason(), d.GetMetadata()
		case *errdetails.RetryInfo:
			e.RetryAfter = d.GetRetryDelay().AsDuration()
		case *errdetails.BadRequest:
			if v := d.GetFieldViolations(); len(v) > 0 {
				e.Field, e.Problem = v[0].GetField(), v[0].GetDescription()
			}
		}
	}
	// gRPC itself answers RESOURCE_EXHAUSTED for an oversize request: that is no rate limit.
	if st.Code() == codes.ResourceExhausted && e.RetryAfter > 0 {
		e.Kind = KindRateLimited
	}
	return e
}
