package main

import "testing"

// Bad flags stop the tool before it sets anything up (exit status 2). A database that does not answer stands in
// for a real one: the flags that pass reach the set-up, which fails (exit status 1).
func TestRatesGivenTwiceAreRefused(t *testing.T) {
	const noDB = "postgres://ferry@127.0.0.1:1/none?sslmode=disable&connect_timeout=1"
	for rates, want := range map[string]int{"100,100": 2, "100,100.2": 2, "0,5": 2, "x": 2, "100,200": 1} {
		if got := run([]string{"-pg", noDB, "-phases", "rate", "-rate", rates}); got != want {
			t.Errorf("-rate %s: exit status %d, want %d", rates, got, want)
		}
	}
}
