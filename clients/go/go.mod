// The versions are those of Debian 12's packages, which the build (GOPATH mode, GO111MODULE=off)
// compiles against: golang-google-grpc-dev, golang-google-protobuf-dev,
// golang-google-genproto-dev and golang-github-golang-protobuf-1-5-dev. With a module proxy,
// `go mod tidy` fetches them and writes go.sum.
module otp-service/clients/go

go 1.19

require (
	// Not imported here, but grpc v1.33.3 decodes status details with it, and the v1.4 that grpc
	// asks for panics decoding a response: v1.5 is needed.
	github.com/golang/protobuf v1.5.2
	google.golang.org/genproto v0.0.0-20200413115906-b5235f65be36
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
