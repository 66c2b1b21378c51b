package otpclient_test

// SendOtp's retries, against an OtpService of this test's own on a real port: it answers
// UNAVAILABLE as told, then a code, and remembers every request it got.

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	otpv1 "otp-service/clients/go/otp/v1"
	"otp-service/clients/go/otpclient"
)

type flakyServer struct {
	otpv1.UnimplementedOtpServiceServer
	mu       sync.Mutex
	failures []*status.Status // answered in turn, then a code is sent
	requests []*otpv1.SendOtpRequest
}

func (s *flakyServer) SendOtp(_ context.Context, request *otpv1.SendOtpRequest) (*otpv1.SendOtpResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, request)
	if len(s.failures) > 0 {
		failure := s.failures[0]
		s.failures = s.failures[1:]
		return nil, failure.Err()
	}
	return &otpv1.SendOtpResponse{Channel: otpv1.Channel_CHANNEL_TEXT, MessageId: "msg-1"}, nil
}

func unavailable(t *testing.T, retryAfter time.Duration) *status.Status {
	st, err := status.New(codes.Unavailable, "try again").WithDetails(
		&errdetails.RetryInfo{RetryDelay: durationpb.New(retryAfter)})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func serve(t *testing.T, server *flakyServer) *otpclient.Client {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	grpcServer := grpc.NewServer()
	otpv1.RegisterOtpServiceServer(grpcServer, server)
	go grpcServer.Serve(listener)
	t.Cleanup(grpcServer.Stop)
	client, err := otpclient.New(listener.Addr().String(), "token")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func TestSendIsRetriedOnUnavailableWithOneKey(t *testing.T) {
	server := &flakyServer{failures: []*status.Status{unavailable(t, 10*time.Millisecond), unavailable(t, 10*time.Millisecond)}}
	sent, err := serve(t, server).SendOtp(context.Background(), "+917003848501")
	if err != nil || sent.MessageID != "msg-1" {
		t.Fatalf("got %+v, %v", sent, err)
	}
	if len(server.requests) != otpclient.SendAttempts {
		t.Fatalf("%d tries, want %d", len(server.requests), otpclient.SendAttempts)
	}
	key := server.requests[0].GetIdempotencyKey()
	for _, request := range server.requests {
		if key == "" || request.GetIdempotencyKey() != key {
			t.Fatalf("keys %q and %q: want one key for every try", key, request.GetIdempotencyKey())
		}
	}
}

func TestSendIsNotRetriedPastItsTriesNorItsDeadline(t *testing.T) {
	failing := []*status.Status{}
	for i := 0; i < 5; i++ {
		failing = append(failing, unavailable(t, 10*time.Millisecond))
	}
	server := &flakyServer{failures: failing}
	client := serve(t, server)
	_, err := client.SendOtp(context.Background(), "+917003848501", otpclient.WithIdempotencyKey("mine"))
	if !errors.Is(err, otpclient.ErrUnavailable) || len(server.requests) != otpclient.SendAttempts {
		t.Fatalf("got %v after %d tries", err, len(server.requests))
	}
	if server.requests[0].GetIdempotencyKey() != "mine" {
		t.Errorf("key %q, want the caller's", server.requests[0].GetIdempotencyKey())
	}

	// A wait longer than the deadline leaves: the error at once, not a retry.
	server = &flakyServer{failures: []*status.Status{unavailable(t, time.Minute)}}
	_, err = serve(t, server).SendOtp(context.Background(), "+917003848501")
	if !errors.Is(err, otpclient.ErrUnavailable) || len(server.requests) != 1 {
		t.Fatalf("got %v after %d tries", err, len(server.requests))
	}
}
