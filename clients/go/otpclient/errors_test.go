package otpclient_test

// Error decoding against a live server (the same variables as the contract test). None of these
// calls sends a code, so they do not touch the test number's cooldown.

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"otp-service/clients/go/otpclient"
)

func liveClient(t *testing.T, opts ...otpclient.Option) (*otpclient.Client, string) {
	target, token, number := os.Getenv("OTP_TARGET"), os.Getenv("OTP_TOKEN"), os.Getenv("OTP_TEST_NUMBER")
	if target == "" || token == "" || number == "" {
		t.Skip("needs OTP_TARGET, OTP_TOKEN, OTP_TEST_NUMBER")
	}
	client, err := otpclient.New(target, token, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, number
}

func TestMalformedCodeIsInvalidInputNamingTheField(t *testing.T) {
	client, number := liveClient(t)
	_, err := client.VerifyOtp(context.Background(), number, "12a")
	var invalid *otpclient.Error
	if !errors.Is(err, otpclient.ErrInvalidInput) || !errors.As(err, &invalid) {
		t.Fatalf("got %v, want invalid input", err)
	}
	if invalid.Reason != "INVALID_CODE" || invalid.Field != "otp_code" || invalid.Problem != "must contain only the digits 0-9" {
		t.Errorf("got %+v", invalid)
	}
}

func TestCallPastItsDeadlineIsUnavailableWithoutReason(t *testing.T) {
	client, number := liveClient(t, otpclient.WithTimeout(time.Nanosecond))
	_, err := client.VerifyOtp(context.Background(), number, "123456")
	var late *otpclient.Error
	if !errors.Is(err, otpclient.ErrUnavailable) || !errors.As(err, &late) {
		t.Fatalf("got %v, want unavailable", err)
	}
	if late.Code != codes.DeadlineExceeded || late.Reason != "" {
		t.Errorf("got %+v", late)
	}
}
