package otpclient_test

// The contract scenario every client runs against a live server (`make test-clients`).
// OTP_TARGET and OTP_TOKEN name the server and a caller token; OTP_TEST_NUMBER is one of the
// server's OTP_TEST_NUMBERS and OTP_TEST_CODE its code.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	otpv1 "otp-service/clients/go/otp/v1"
	"otp-service/clients/go/otpclient"
)

func TestContract(t *testing.T) {
	target, token := os.Getenv("OTP_TARGET"), os.Getenv("OTP_TOKEN")
	number, code := os.Getenv("OTP_TEST_NUMBER"), os.Getenv("OTP_TEST_CODE")
	if target == "" || token == "" || number == "" || code == "" {
		t.Skip("needs OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER, OTP_TEST_CODE")
	}
	wrong := strings.Map(func(digit rune) rune { return '0' + (digit-'0'+1)%10 }, code)
	ctx := context.Background()

	client, err := otpclient.New(target, token)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	key := fmt.Sprintf("contract-%d", time.Now().UnixNano())
	sent, err := client.SendOtp(ctx, number, otpclient.WithIdempotencyKey(key))
	if err != nil {
		t.Fatal(err)
	}
	if sent.Channel != otpv1.Channel_CHANNEL_TEST {
		t.Errorf("channel %v, want CHANNEL_TEST", sent.Channel)
	}
	// A retry with the same key answers the same, sending nothing.
	again, err := client.SendOtp(ctx, number, otpclient.WithIdempotencyKey(key))
	if err != nil || *again != *sent {
		t.Fatalf("a retry with the same key answered %+v, %v; want %+v", again, err, sent)
	}

	status, err := client.GetOtpStatus(ctx, number)
	if err != nil {
		t.Fatal(err)
	}
	if status.State != otpv1.DeliveryState_DELIVERY_STATE_QUEUED || status.Channel != otpv1.Channel_CHANNEL_TEST || status.Verified || !status.ExpiresAt.Equal(sent.ExpiresAt) {
		t.Errorf("status %+v, want a queued, unverified test code expiring at %v", status, sent.ExpiresAt)
	}

	result, err := client.VerifyOtp(ctx, number, wrong)
	if err != nil {
		t.Fatal(err)
	}
	if result.Outcome != otpv1.VerifyOutcome_VERIFY_OUTCOME_WRONG_CODE || result.AttemptsRemaining <= 0 {
		t.Errorf("wrong code answered %+v, want WRONG_CODE with attempts left", result)
	}
	if result, err = client.VerifyOtp(ctx, number, code); err != nil || !result.Verified {
		t.Fatalf("right code answered %+v, %v", result, err)
	}
	if status, err = client.GetOtpStatus(ctx, number); err != nil || !status.Verified {
		t.Fatalf("status after verifying: %+v, %v", status, err)
	}

	_, err = client.SendOtp(ctx, number)
	var limited *otpclient.Error
	if !errors.Is(err, otpclient.ErrRateLimited) || !errors.As(err, &limited) {
		t.Fatalf("resend in the cooldown answered %v, want rate limited", err)
	}
	if limited.Reason != otpv1.ErrorReason_RESEND_COOLDOWN.String() || limited.RetryAfter < time.Second {
		t.Errorf("rate limited with reason %q, retry after %v", limited.Reason, limited.RetryAfter)
	}

	// A number not on WhatsApp (when the server's Interakt reports one): the failure is typed.
	if unreachable := os.Getenv("OTP_UNREACHABLE_NUMBER"); unreachable != "" {
		if _, err = client.SendOtp(ctx, unreachable); err != nil {
			t.Fatal(err)
		}
		failed, err := client.GetOtpStatus(ctx, unreachable)
		for deadline := time.Now().Add(15 * time.Second); err == nil && failed.State != otpv1.DeliveryState_DELIVERY_STATE_FAILED && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			failed, err = client.GetOtpStatus(ctx, unreachable)
		}
		if err != nil || failed.State != otpv1.DeliveryState_DELIVERY_STATE_FAILED || failed.Failure != otpv1.DeliveryFailure_DELIVERY_FAILURE_NOT_ON_WHATSAPP || failed.FailureReason == "" {
			t.Fatalf("status of a number not on WhatsApp: %+v, %v; want FAILED, NOT_ON_WHATSAPP", failed, err)
		}
	}

	stranger, err := otpclient.New(target, "not-"+token)
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	_, err = stranger.SendOtp(ctx, number)
	var refused *otpclient.Error
	if !errors.Is(err, otpclient.ErrUnauthenticated) || !errors.As(err, &refused) || refused.Reason != "CALLER_NOT_AUTHENTICATED" {
		t.Fatalf("a wrong token answered %v, want unauthenticated", err)
	}
}
