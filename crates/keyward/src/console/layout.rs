//! The console's frame: the page shell, navigation, notices, and the pages every part shares
//! (sign-in, the one-time secret).

use super::{Notice, Session, Shown};
use crate::model::{AdminRole, Permission};
use maud::{html, Markup, DOCTYPE};

/// Which top-level section a page belongs to (the navigation marks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Agents,
    Envoys,
    Audit,
    Admins,
    None,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · keyward" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// A CSRF field for a form of this session.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// Whether the signed-in admin may make changes of this kind (forms are hidden otherwise;
/// the server refuses them regardless).
pub fn may(session: &Session, p: Permission) -> bool {
    session.actor.role.allows(p)
}

pub fn page(title: &str, session: Option<&Session>, nav: Nav, notices: &[Notice], body: Markup) -> Markup {
    let item = |which: Nav, href: &str, label: &str| {
        html! {
            li { a href=(href) aria-current=[(nav == which).then_some("page")] { (label) } }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console/agents" { span.logo aria-hidden="true" { "⬡" } " keyward" }
                    @if let Some(s) = session {
                        nav aria-label="Main" {
                            ul {
                                (item(Nav::Agents, "/console/agents", "API keys"))
                                (item(Nav::Envoys, "/console/envoys", "Envoys"))
                                (item(Nav::Audit, "/console/audit", "Audit log"))
                                @if s.actor.role == AdminRole::Owner {
                                    (item(Nav::Admins, "/console/admins", "Admins"))
                                }
                            }
                        }
                        div.who {
                            span { (s.actor.name) " " span.role { (s.actor.role.as_str()) } }
                            form method="post" action="/console/signout" {
                                (csrf(s))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" {
                    @for n in notices {
                        p class=(if n.ok { "notice ok" } else { "notice bad" }) role=(if n.ok { "status" } else { "alert" }) { (n.text) }
                    }
                    (body)
                }
            }
        }
    }
}

pub fn signin(error: Option<&str>) -> Markup {
    let body = html! {
        div.card.narrow {
            h1 { "Sign in to keyward" }
            p.muted { "Use your personal admin token (" code { "keyward admin token NAME" } " issues one), or the bootstrap admin token." }
            @if let Some(e) = error {
                p.notice.bad role="alert" { (e) }
            }
            form method="post" action="/console/signin" {
                div.field {
                    label for="token" { "Admin token" }
                    input id="token" name="token" type="password" autocomplete="off" required autofocus;
                }
                div.actions { button.primary type="submit" { "Sign in" } }
            }
        }
    };
    page("Sign in", None, Nav::None, &[], body)
}

/// The once-only page of a new secret; `None` once it has been shown.
pub fn shown(shown: Option<&Shown>) -> Markup {
    match shown {
        Some(s) => html! {
            h1 { "Copy your new key" }
            div.card {
                p { (s.what) }
                div.secret {
                    label for="secret" { "Key" }
                    div.copyrow {
                        input id="secret" type="text" readonly value=(s.secret) spellcheck="false" autocomplete="off";
                        button.primary type="button" data-copy="secret" { "Copy" }
                    }
                }
                p.notice.warn role="note" {
                    strong { "Copy this key now and store it in a secure place." }
                    " You can't view or reveal it again after you leave this page. If you lose it, revoke it and generate a new one."
                }
                @if let Some(note) = &s.note {
                    p { (note) }
                }
                @if let Some(k) = &s.key {
                    dl.facts {
                        dt { "Key id" } dd { code { (k.id) } }
                        dt { "Scopes" } dd { (k.scopes.join(", ")) }
                        dt { "Expires" } dd { (k.expires_at.as_deref().unwrap_or("never")) }
                    }
                }
                a.button href=(s.back) { "Done" }
            }
        },
        None => html! {
            h1 { "Nothing to show" }
            div.card {
                p { "This key has already been shown. A key is shown once, when it is made; keyward keeps only its SHA-256 digest." }
                p { "If it was lost, revoke it and generate a new one." }
                a.button href="/console/agents" { "Back to API keys" }
            }
        },
    }
}

/// A status badge.
pub fn badge(status: &str) -> Markup {
    let class = match status {
        "active" | "enabled" | "on" | "connected" | "current" => "badge ok",
        "expiring" | "rotating" | "lagging" | "stale" => "badge warn",
        _ => "badge off",
    };
    html! { span class=(class) { (status) } }
}

/// A time as the store gives it (RFC 3339), shorter for a table.
pub fn when(t: Option<&str>) -> Markup {
    match t {
        Some(t) => html! { time datetime=(t) { (t.replacen('T', " ", 1).trim_end_matches('Z')) } },
        None => html! { span.muted { "—" } },
    }
}

/// A script-free confirmation: what will happen, and a button that does it.
pub fn confirm(session: &Session, action: &str, question: &str, consequence: &str, button: &str, back: &str, extra: Markup) -> Markup {
    html! {
        h1 { (question) }
        div.card {
            p { (consequence) }
            form method="post" action=(action) {
                (csrf(session))
                input type="hidden" name="confirm" value="yes";
                (extra)
                div.actions {
                    button.danger type="submit" { (button) }
                    a.button.secondary href=(back) { "Cancel" }
                }
            }
        }
    }
}
