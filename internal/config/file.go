package config

import (
	"os"
	"path/filepath"
)

// configFileMode is the mode of files ferry writes that hold secrets (the config, the registration).
const configFileMode os.FileMode = 0o600

// WriteFileAtomic writes data to path through a temporary file in the same directory, renamed over path once
// synced, so readers see the old or the new content and never a partial file. The file gets mode perm
// regardless of the umask. A symlink at path is followed: its target is replaced.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	if resolved, resolveErr := filepath.EvalSymlinks(path); resolveErr == nil {
		path = resolved
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	// Restrict the mode before any byte of a secret is written.
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	// Persist the rename itself; not every platform can sync a directory, so this is best effort.
	if d, openErr := os.Open(dir); openErr == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
