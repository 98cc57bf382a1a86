//! Fixtures of the dockerd end-to-end tests shared by every storage backend's test binary: a classic Dockerfile
//! exercising what a layer store must get right (files changed and deleted, an opaque directory, hardlinks,
//! symlinks, owners and modes, a `VOLUME`), the expected effects, a whole-tree listing for comparisons with
//! dockerd's own vfs driver, and a `docker diff` workload with its expected output.

use std::fs;
use std::path::Path;

use crate::Dockerd;

/// Prints, for every path of the container's root filesystem (own filesystem only; /proc, /sys, /dev and the
/// files dockerd bind-mounts are left out, and so is the /data volume: on vfs it shares the host's st_dev, so
/// -xdev would not stop there), its type, mode, owner, link count, size, content digest or link
/// target. Two containers with the same line-for-line output have the same visible tree.
pub const LIST_TREE: &str = r#"find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /data \) -prune -o -print | sort | while read -r p; do
  if [ -L "$p" ]; then echo "$p L $(stat -c '%u:%g' "$p") -> $(readlink "$p")"
  elif [ -f "$p" ]; then echo "$p F $(stat -c '%a %u:%g %h %s' "$p") $(md5sum < "$p" | cut -d' ' -f1)"
  elif [ -d "$p" ]; then echo "$p D $(stat -c '%a %u:%g' "$p")"
  else echo "$p O $(stat -c '%F %a %u:%g %t:%T' "$p")"; fi
done"#;

/// Lists the visible tree of a container of `image` (see [`LIST_TREE`]).
pub fn list_tree(d: &Dockerd, image: &str) -> String {
    d.ok(&["run", "--rm", "--network", "none", image, "sh", "-c", LIST_TREE])
}

/// Line-by-line difference of two listings, for assertion messages.
pub fn diff_lines(left_name: &str, left: &str, right_name: &str, right: &str) -> String {
    let l: std::collections::BTreeSet<&str> = left.lines().collect();
    let r: std::collections::BTreeSet<&str> = right.lines().collect();
    let mut out = String::new();
    for x in l.difference(&r) {
        out.push_str(&format!("only on {left_name}: {x}\n"));
    }
    for x in r.difference(&l) {
        out.push_str(&format!("only on {right_name}: {x}\n"));
    }
    out
}

/// Asserts two tree listings are equal, naming the lines only one side has.
pub fn assert_same_tree(what: &str, a_name: &str, a: &str, b_name: &str, b: &str) {
    assert!(
        a == b,
        "{what}: visible trees differ ({} vs {} lines):\n{}",
        a.lines().count(),
        b.lines().count(),
        diff_lines(a_name, a, b_name, b)
    );
}

/// Panics unless `image` has the same DiffIDs and the same visible tree (see [`list_tree`]) on `a` and on `b`;
/// `what` names the step (e.g. `loaded into vfs`) in the messages.
pub fn assert_same_image(what: &str, a: &Dockerd, b: &Dockerd, image: &str) {
    let layers = |x: &Dockerd| x.ok(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", image]);
    assert_eq!(layers(a), layers(b), "DiffIDs of {image} {what}");
    assert_same_tree(
        what,
        &a.driver,
        &list_tree(a, image),
        &b.driver,
        &list_tree(b, image),
    );
}

/// The lines of a `docker diff` output, sorted by path.
pub fn sorted_lines(s: &str) -> String {
    let mut v: Vec<&str> = s.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    v.sort_by(|a, b| a.get(2..).cmp(&b.get(2..)).then(a.cmp(b)));
    v.join("\n")
}

/// A classic Dockerfile on `bb:1` (testkit's busybox image).
pub const DOCKERFILE: &str = r#"FROM bb:1
COPY ctx.txt /ctx/ctx.txt
COPY ctx-dir/ /ctx/dir/
RUN mkdir -p /d/sub /keep /data \
 && echo old > /d/f && echo lower > /d/g && echo deep > /d/sub/h \
 && echo base > /keep/over && echo gone > /keep/del && echo src > /keep/hl-src \
 && echo seed > /data/seed && echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd
RUN echo new-content > /keep/over && rm /keep/del && rm -rf /d && mkdir /d && echo new > /d/f \
 && rm /bin/true && echo 'grp:x:5:' > /etc/group
RUN ln /keep/hl-src /keep/hl && ln -s /keep/over /keep/sym && ln -s ../keep /rel-sym \
 && chmod 4750 /keep/hl-src && chown 123:456 /keep/over && chmod 0700 /d && chown -h 7:8 /keep/sym
VOLUME /data
CMD ["sh"]
"#;

/// Prints each effect of DOCKERFILE on one line.
pub const CHECK_EFFECTS: &str = r#"
echo "ctx=$(cat /ctx/ctx.txt)"
echo "ctxdir=$(cat /ctx/dir/a) $(stat -c '%a' /ctx/dir/a) $(cat /ctx/dir/n/b)"
echo "over=$(cat /keep/over) $(stat -c '%u:%g' /keep/over)"
echo "del=$(test -e /keep/del && echo present || echo absent)"
echo "d=$(ls -A /d | tr '\n' ' ')$(cat /d/f) $(stat -c '%a' /d)"
echo "true=$(test -e /bin/true -o -L /bin/true && echo present || echo absent)"
echo "group=$(cat /etc/group)"
echo "passwd=$(grep -c '^app:' /etc/passwd)"
echo "hl=$(cat /keep/hl) $(stat -c '%a %h' /keep/hl) $(test /keep/hl -ef /keep/hl-src && echo same-inode)"
echo "sym=$(readlink /keep/sym) $(cat /keep/sym) $(stat -c '%u:%g' /keep/sym)"
echo "relsym=$(readlink /rel-sym) $(ls /rel-sym/ | tr '\n' ' ')"
echo "data=$(cat /data/seed) $(grep -c ' /data ' /proc/self/mountinfo)"
"#;

/// `docker run` of [`CHECK_EFFECTS`] in a container of `built:1`.
pub const CHECK_RUN: [&str; 8] = [
    "run",
    "--rm",
    "--network",
    "none",
    "built:1",
    "sh",
    "-c",
    CHECK_EFFECTS,
];

/// What [`CHECK_EFFECTS`] prints in a container of the image built from [`DOCKERFILE`].
pub const EXPECTED_EFFECTS: &str = "ctx=from the build context
ctxdir=A 600 B
over=new-content 123:456
del=absent
d=f new 700
true=absent
group=grp:x:5:
passwd=1
hl=src 4750 2 same-inode
sym=/keep/over new-content 7:8
relsym=../keep hl hl-src over sym 
data=seed 1";

/// Writes [`DOCKERFILE`] and its build context into `dir`.
pub fn write_context(dir: &Path) {
    fs::create_dir_all(dir.join("ctx-dir/n")).unwrap();
    fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    fs::write(dir.join("ctx.txt"), "from the build context\n").unwrap();
    fs::write(dir.join("ctx-dir/a"), "A\n").unwrap();
    fs::write(dir.join("ctx-dir/n/b"), "B\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.join("ctx-dir/a"), fs::Permissions::from_mode(0o600)).unwrap();
}

/// Builds [`DOCKERFILE`] as `tag` with the classic builder.
pub fn build(d: &Dockerd, tag: &str) {
    let ctx = d.dir().join(format!("ctx-{}", tag.replace(':', "_")));
    write_context(&ctx);
    let out = d.docker(&["build", "--network", "none", "-t", tag, ctx.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "docker build on -s {} failed:\n{}\n{}",
        d.driver,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A container command whose `docker diff` is [`EXPECTED_DIFF`].
pub const DIFF_STEPS: &str = "echo x > /new && rm /etc/group && echo y >> /etc/passwd && mkdir -p /a/b \
     && echo z > /a/b/c && rm -rf /tmp && ln -s /x /lnk && rm /bin/vi && mkdir /root/r";

/// `docker run` of [`DIFF_STEPS`] in a container `c1` of `bb:1`.
pub const DIFF_RUN: [&str; 9] = [
    "run",
    "--name",
    "c1",
    "--network",
    "none",
    "bb:1",
    "sh",
    "-c",
    DIFF_STEPS,
];

/// The sorted `docker diff` of [`DIFF_STEPS`] on `bb:1`.
pub const EXPECTED_DIFF: &str = "A /a
A /a/b
A /a/b/c
C /bin
D /bin/vi
C /etc
D /etc/group
C /etc/passwd
A /lnk
A /new
C /root
A /root/r
D /tmp";

/// `docker rm -f -v` of every container, then `docker rmi -f` of every image until none is left (asserted).
pub fn remove_everything(d: &Dockerd) {
    let ids = d.ok(&["ps", "-aq"]);
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids.lines());
        d.ok(&args);
    }
    // tagged images first; their untagged parents (build steps) go with them
    for _ in 0..5 {
        let imgs = d.ok(&["images", "-q"]);
        if imgs.is_empty() {
            break;
        }
        let mut imgs: Vec<&str> = imgs.lines().collect();
        imgs.sort();
        imgs.dedup();
        let mut args = vec!["rmi", "-f"];
        args.extend(imgs);
        // parents listed before their children are refused; the next round gets them
        let _ = d.docker(&args);
    }
    assert_eq!(d.ok(&["images", "-aq"]), "");
}
