// nonewprivs prints the effective uid it runs with. Installed setuid root in
// the critest "nonewprivs" image: started as uid 1000, it prints 0 unless the
// container's no_new_privs bit kept execve from granting the setuid owner.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
